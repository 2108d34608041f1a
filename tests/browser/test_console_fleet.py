"""The fleet page in a real browser: every device (the real agent, the simulated ones, the two
that left) with its counts, filters, sorting, paging info, live updates; screenshots at
desktop and phone sizes."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

from playwright.sync_api import Page

from tests.agent_proc import REPO
from tests.browser.conftest import BROWSER_TESTS, PHONE, Session
from tests.browser.console_stack import (
    AGENT_ID,
    AGENT_STREAM,
    GONE,
    GONE_PREFIX,
    LAB_DEVICES,
    LAB_TAG,
    MODEL,
    SIMULATED,
    ConsoleStack,
    sim_id,
)
from tests.waiting import stop_process, wait_for

pytestmark = BROWSER_TESTS


def _rows(page: Page) -> list[str]:
    return [str(v) for v in page.eval_on_selector_all("#devices tbody tr[data-device]",
                                                      "rows => rows.map(r => r.dataset.device)")]  # fmt: skip


def _count(page: Page, which: str) -> int:
    return int(page.inner_text(f"#count-{which}").strip())


def _apply(page: Page, **fields: str) -> None:
    """Set the filter fields and submit in one step (a live update in between would put the
    page's own values back: test_typing_in_the_search_box_survives_live_updates)."""
    with page.expect_navigation():
        page.evaluate(
            """fields => {
                 const form = document.querySelector('#filters');
                 for (const [name, value] of Object.entries(fields)) form.elements[name].value = value;
                 form.querySelector('#apply').click();
               }""",
            fields,
        )


def test_fleet_lists_every_device_with_counts_and_summary_columns(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    known = console.api("viewer", "/api/v1/devices")["devices"]
    online = sum(1 for d in known if d["online"])
    s = session()
    page = s.login("viewer")
    assert _count(page, "total") == len(known) >= SIMULATED + GONE + 1
    assert _count(page, "online") == online >= SIMULATED + 1
    assert _count(page, "offline") == len(known) - online >= GONE
    rows = _rows(page)
    assert set(rows) == {d["id"] for d in known}, rows
    assert page.inner_text("#page-info").strip() == "page 1 of 1"

    agent = page.locator(f'tr[data-device="{AGENT_ID}"]')
    assert agent.locator(".state").inner_text().strip() == "online"
    assert f"{AGENT_STREAM}: {MODEL}@" in agent.locator(".models").inner_text()
    sim = page.locator(f'tr[data-device="{sim_id(1)}"]')
    assert sim.locator(".state").inner_text().strip() == "online"
    assert f"cam0: {MODEL}@1" in sim.locator(".models").inner_text()
    for cell in (".fps", ".p95", ".cpu", ".temp"):
        assert re.search(r"\d", sim.locator(cell).inner_text()), cell
    assert re.search(r"\d", agent.locator(".fps").inner_text())
    assert sim.locator(".last-seen").inner_text().strip()
    gone = page.locator(f'tr[data-device="{GONE_PREFIX}-0001"] .state')
    assert gone.inner_text().strip() == "offline"
    s.screenshot("fleet")


def test_fleet_filters_by_text_tag_state_and_model(session: Callable[..., Session]) -> None:
    s = session()
    page = s.login("viewer")
    _apply(page, q="sim-001")
    assert sorted(_rows(page)) == [sim_id(n) for n in range(10, 20)]
    assert "q=sim-001" in page.url
    _apply(page, q="", tag=LAB_TAG)
    assert sorted(_rows(page)) == sorted(LAB_DEVICES)
    _apply(page, tag="", state="offline")
    offline = _rows(page)
    assert {f"{GONE_PREFIX}-{n:04d}" for n in range(1, GONE + 1)} <= set(offline), offline
    states = page.locator("#devices tbody tr[data-device] .state").all_inner_texts()
    assert {st.strip() for st in states} == {"offline"}, states
    _apply(page, state="online", q=AGENT_ID)
    assert _rows(page) == [AGENT_ID]
    # The counts stay the whole fleet's.
    assert _count(page, "total") >= SIMULATED + GONE + 1
    _apply(page, q="nothing-matches-this")
    assert _rows(page) == []


def test_fleet_sorts_by_id_and_cpu_both_ways(session: Callable[..., Session]) -> None:
    s = session()
    page = s.login("viewer")
    ids = _rows(page)
    with page.expect_navigation():
        page.click("a.sort[data-sort=id]")
    first = _rows(page)
    with page.expect_navigation():
        page.click("a.sort[data-sort=id]")
    second = _rows(page)
    assert {tuple(first), tuple(second)} == {tuple(sorted(ids)), tuple(sorted(ids, reverse=True))}
    for _ in range(2):
        with page.expect_navigation():
            page.click("a.sort[data-sort=cpu]")
        assert "sort=cpu" in page.url
        cells = page.eval_on_selector_all(
            "#devices tbody tr[data-device] .cpu", "cells => cells.map(c => c.textContent.trim())"
        )
        values = [float(c.rstrip("%")) for c in cells if re.fullmatch(r"[\d.]+%?", c)]
        assert len(values) >= SIMULATED, cells  # the ones without CPU come last
        descending = "order=desc" in page.url
        assert values == sorted(values, reverse=descending), (page.url, values)
        blank = [i for i, c in enumerate(cells) if not re.fullmatch(r"[\d.]+%?", c)]
        assert all(i >= len(values) for i in blank), cells  # NULLs last


def test_fleet_is_readable_on_a_phone_and_updates_live(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    s = session(viewport=PHONE)
    page = s.login("viewer")
    assert page.get_attribute("#main", "data-live") == "fleet"
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page scrolls sideways on a phone: {width}px"
    s.screenshot("fleet-phone")
    total = _count(page, "total")
    page.evaluate("window.__edgefleetMarker = 'still here'")
    url, username, password = console.broker()
    late = [sys.executable, "-m", "tools.simulator", "--broker", url]
    late += ["--username", username, "--password", password]
    late += ["--devices", "1", "--prefix", "late", "--telemetry-interval", "1"]
    with console.log("late").open("ab") as out:
        proc = subprocess.Popen(late, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        page.wait_for_selector('tr[data-device="late-0001"]', timeout=20_000)
        wait_for(lambda: _count(page, "total") == total + 1, timeout=10, what="the new count")
        assert page.evaluate("window.__edgefleetMarker") == "still here"  # not reloaded
    finally:
        stop_process(proc, timeout=15)


def test_typing_in_the_search_box_survives_live_updates(session: Callable[..., Session]) -> None:
    s = session()
    page = s.login("viewer")
    page.evaluate(
        """() => { window.__swaps = 0;
                   document.addEventListener('console:swapped', () => window.__swaps++); }"""
    )
    page.click("#q")
    page.keyboard.type("sim-00")
    # Twenty devices report every second: the page swaps in fresh data meanwhile.
    page.wait_for_function("() => window.__swaps >= 2", timeout=15_000)
    assert page.input_value("#q") == "sim-00", "a live update threw away what was typed"
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "q=sim-00" in page.url


def test_fleet_pages_through_more_than_fifty_devices(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    """Last in this file: 35 more (offline) devices make two pages."""
    console.simulate("--devices", "35", "--prefix", "page", "--count", "1")
    known = {d["id"] for d in console.api("viewer", "/api/v1/devices?limit=1000")["devices"]}
    assert len(known) > 50
    s = session()
    page = s.login("viewer")
    wait_for(lambda: _count(page, "total") == len(known), timeout=10, what="the new devices")
    s.goto("/ui/fleet")  # the table as of now (a live update swaps in the same)
    first = _rows(page)
    assert len(first) == 50 and page.inner_text("#page-info").strip() == "page 1 of 2"
    assert page.get_attribute("#prev", "href") is None  # no previous page
    with page.expect_navigation():
        page.click("#next")
    second = _rows(page)
    assert page.inner_text("#page-info").strip() == "page 2 of 2"
    assert page.get_attribute("#next", "href") is None
    assert set(first).isdisjoint(second) and set(first) | set(second) == known
    assert first + second == sorted(known)  # by id, stable across pages
    with page.expect_navigation():
        page.click("#prev")
    assert _rows(page) == first
