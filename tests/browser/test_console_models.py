"""The model registry pages in a real browser: both published versions with size, runtime and
signing key; one version's lineage, its golden sample drawn with the expected boxes."""

from __future__ import annotations

from collections.abc import Callable

from tests.browser.conftest import BROWSER_TESTS, Session
from tests.browser.console_stack import (
    BAD,
    GOOD,
    MODEL,
    SOURCE_COMMIT,
    TRAINING_DATA,
    ConsoleStack,
)
from tests.waiting import wait_for

pytestmark = BROWSER_TESTS

RUNNER = "sim-0017"


def test_models_list_and_a_versions_lineage_golden_sample_and_devices(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    # A device runs GOOD once this small rollout (made through the API) has completed.
    body = {"model": f"{MODEL}@{GOOD}", "select": [RUNNER], "stages": "1", "bake_s": 0}
    rid = console.api("operator", "/api/v1/rollouts", method="POST", body=body)["id"]
    wait_for(
        lambda: console.rollout(rid)["state"] == "completed",
        timeout=60,
        what=lambda: f"rollout {rid} to complete: {console.rollout(rid)}",
    )
    running = console.api("viewer", f"/api/v1/devices?model={MODEL}@{GOOD}")["devices"]
    assert RUNNER in {d["id"] for d in running}
    published = {
        f"{m['name']}@{m['version']}": m for m in console.api("viewer", "/api/v1/models")["models"]
    }
    s = session()
    s.login("viewer")
    page = s.page
    page.click("#nav-models")
    page.wait_for_url("**/ui/models")
    for version in (GOOD, BAD):
        ref = f"{MODEL}@{version}"
        row = page.locator(f'tr[data-model="{ref}"]')
        assert row.count() == 1, ref
        assert row.locator(".runtime").inner_text().strip() == "litert"
        assert row.locator(".size").inner_text().strip()
        assert published[ref]["key_id"] == console.key_id  # the key the stack signs with
        assert row.locator(".key-id").inner_text().strip() == console.key_id
        shown = int(row.locator(".devices").inner_text())
        assert shown == (len(running) if version == GOOD else 0), (ref, shown)
    s.screenshot("models")

    with page.expect_navigation():
        page.click(f'tr[data-model="{MODEL}@{GOOD}"] a')
    lineage = page.inner_text("#lineage")
    assert SOURCE_COMMIT in lineage and TRAINING_DATA in lineage, lineage
    golden = page.locator("figure.golden")
    assert golden.count() == 1
    img = golden.locator("img")
    img.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    boxes = golden.locator("svg.boxes rect")
    assert boxes.count() >= 1, golden.inner_html()  # the astronaut's face
    x, width = (
        float(boxes.first.get_attribute("x") or -1),
        float(boxes.first.get_attribute("width") or -1),
    )
    assert 0 <= x <= 1 and 0 < width <= 1
    listed = page.locator("#running li").all_inner_texts()
    assert len(listed) == len(running) and any(RUNNER in li for li in listed), listed
