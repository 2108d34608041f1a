"""Rollouts from the console in a real browser: the form's preview, confirm and create; a good
model's rollout reaching ``completed`` on its page without a reload; a bad model's rollout
aborting with its reason; pause and resume."""

from __future__ import annotations

import re
from collections.abc import Callable

from playwright.sync_api import Page

from tests.browser.conftest import BROWSER_TESTS, Session
from tests.browser.console_stack import BAD, GOOD, MODEL, ConsoleStack, sim_id

pytestmark = BROWSER_TESTS

MARKER = "window.__edgefleetMarker"


def _create(
    s: Session, *, version: str, devices: list[str], stages: str, bake: str, max_failures: str
) -> int:
    """Fill in the form, preview (the count), confirm and create; the new rollout's id."""
    page = s.page
    s.goto("/ui/rollouts")
    with page.expect_navigation():
        page.click("#new-rollout")
    page.select_option("select#model", f"{MODEL}@{version}")
    page.fill("input#select", ",".join(devices))
    assert page.input_value("input#stream") == "*"
    page.fill("input#stages", stages)
    page.fill("input#bake", bake)
    page.fill("input#max-failures", max_failures)
    with page.expect_navigation():
        page.click("#preview")
    assert page.locator("#error").count() == 0, page.inner_text("#error")
    assert int(page.inner_text("#preview-count")) == len(devices)
    listed = page.locator("#preview-devices li").all_inner_texts()
    assert sorted(li.split(":")[0] for li in listed) == sorted(devices), listed
    assert page.input_value("input#select") == ",".join(devices)  # the form filled in again
    page.check("input#confirm")
    with page.expect_navigation():
        page.click("button#create")
    found = re.search(r"/ui/rollouts/(\d+)$", page.url)
    assert found, page.url
    return int(found.group(1))


def _wait_for_button(page: Page, selector: str) -> None:
    try:
        page.wait_for_selector(selector, timeout=15_000)
    except Exception as err:
        raise AssertionError(
            f"no {selector} on {page.url}:\n{page.inner_text('body')[:2000]}"
        ) from err


def _state(page: Page) -> str:
    return page.inner_text("#rollout-state").strip()


def test_a_good_models_rollout_created_in_the_form_completes_live(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    s = session()
    s.login("operator")
    devices = [sim_id(n) for n in range(1, 5)]
    rid = _create(s, version=GOOD, devices=devices, stages="1,50%,100%", bake="0s",
                  max_failures="0")  # fmt: skip
    page = s.page
    assert page.get_attribute("#main", "data-live") == f"rollout:{rid}"
    page.evaluate(f"{MARKER} = 'no reload'")
    first = _state(page)
    assert first in {"active", "completed"}, first
    page.wait_for_function(
        "() => document.querySelector('#rollout-state').textContent.trim() === 'completed'",
        timeout=60_000,
    )
    assert page.evaluate(MARKER) == "no reload", "the page was reloaded"
    assert first == "active", "done before the page showed it running: nothing was live"
    for n in range(1, 4):
        progress = page.locator(f'#stages tr[data-stage="{n}"] .progress').inner_text()
        assert progress.strip(), n
    for device in devices:
        row = page.locator(f'#executions tr[data-device="{device}"]')
        assert row.locator(".phase").inner_text().strip() == "committed", device
    assert console.rollout(rid)["state"] == "completed"
    s.screenshot("rollout")
    s.goto("/ui/rollouts")
    row = page.locator(f'tr[data-rollout="{rid}"]')
    assert row.locator(".state").inner_text().strip() == "completed"
    assert row.locator(".model").inner_text().strip() == f"{MODEL}@{GOOD}"


def test_a_bad_models_rollout_aborts_with_its_reason_shown(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    s = session()
    s.login("operator")
    devices = [sim_id(5), sim_id(6)]
    rid = _create(s, version=BAD, devices=devices, stages="1,100%", bake="0s", max_failures="0")
    page = s.page
    page.evaluate(f"{MARKER} = 'no reload'")
    page.wait_for_function(
        """() => ['aborted', 'rolled_back'].includes(
                 document.querySelector('#rollout-state').textContent.trim())""",
        timeout=60_000,
    )
    assert page.evaluate(MARKER) == "no reload"
    page.wait_for_selector("#abort-reason")
    reason = page.inner_text("#abort-reason")
    api = console.rollout(rid)
    assert api["reason"] == "stage_failed", api
    assert "stage 1" in reason and "failed" in reason, reason
    failed = page.locator(f'#executions tr[data-device="{sim_id(5)}"] .reason')
    assert failed.inner_text().strip() == "golden_mismatch"
    # The second device was never asked to deploy it.
    second = next(d for d in api["devices"] if d["device_id"] == sim_id(6))
    assert second["rev"] is None, second


def test_pause_and_resume_from_the_rollout_page(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    s = session()
    s.login("operator")
    devices = [sim_id(7), sim_id(8)]
    rid = _create(s, version=GOOD, devices=devices, stages="1,100%", bake="10m",
                  max_failures="0")  # fmt: skip
    page = s.page
    _wait_for_button(page, "#pause")
    with page.expect_navigation():
        page.click("#pause")
    assert page.url.endswith(f"/ui/rollouts/{rid}"), page.url
    assert _state(page) == "paused"
    assert console.rollout(rid)["state"] == "paused"
    with page.expect_navigation():
        page.click("#resume")
    assert _state(page) == "active"
    assert console.rollout(rid)["state"] == "active"
    with page.expect_navigation():
        page.click("#abort")  # the confirm() dialog is accepted
    page.wait_for_function(
        """() => ['aborted', 'rolled_back'].includes(
                 document.querySelector('#rollout-state').textContent.trim())"""
    )
    assert console.rollout(rid)["state"] in {"aborted", "rolled_back"}
