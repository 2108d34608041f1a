"""The device page in a real browser, for the real agent on the shipped video: its state and
streams, the server-drawn telemetry charts, and the latest snapshot, whose drawn box is on the
face (the shipped model finds the face there again, and the box's green is where the snapshot's
detections say)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from inference.detector import load_detector
from tests.agent_proc import REPO
from tests.browser.conftest import BROWSER_TESTS, Session
from tests.browser.console_stack import (
    AGENT_ID,
    AGENT_STREAM,
    MODEL,
    SIM_EVENT,
    ConsoleStack,
    sim_id,
)
from tests.waiting import wait_for

pytestmark = BROWSER_TESTS

METRICS = ("fps", "latency_p50", "latency_p95", "cpu", "mem", "temp", "spool", "psi")
MANIFEST = REPO / "inference" / "assets" / "blazeface-short-int8.json"
Box = Sequence[float]


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _green_on_outline(image: npt.NDArray[Any], box: Box) -> float:
    """The share of points along ``box``'s outline with the drawn green (BGR 0,255,0, JPEG
    noise allowed) within a few pixels."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (round(box[0] * (w - 1)), round(box[1] * (h - 1)),
                      round(box[2] * (w - 1)), round(box[3] * (h - 1)))  # fmt: skip
    b, g, r = (image[..., i].astype(int) for i in range(3))
    green = (g > 150) & (r < 120) & (b < 120)
    hits = total = 0
    for t in np.linspace(0.15, 0.85, 15):
        x, y = round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
        # A few pixels across each edge: top, bottom, left, right.
        for top, bottom, left, right in [
            (y0 - 4, y0 + 5, x, x + 1),
            (y1 - 4, y1 + 5, x, x + 1),
            (y, y + 1, x0 - 4, x0 + 5),
            (y, y + 1, x1 - 4, x1 + 5),
        ]:
            total += 1
            hits += bool(green[max(0, top) : min(h, bottom), max(0, left) : min(w, right)].any())
    return hits / total


def test_device_page_shows_state_streams_charts_and_events(
    session: Callable[..., Session],
) -> None:
    s = session()
    page = s.login("viewer")
    with page.expect_navigation():
        page.click(f'tr[data-device="{AGENT_ID}"] .id a')
    assert page.url.endswith(f"/ui/devices/{AGENT_ID}"), page.url
    assert page.get_attribute("#main", "data-live") == f"device:{AGENT_ID}"
    assert page.inner_text("#device-state").strip() == "online"
    assert page.inner_text("#device-facts").strip()
    stream = page.locator(f'#streams tr[data-stream="{AGENT_STREAM}"]')
    assert f"{MODEL}@" in stream.locator(".active-model").inner_text()
    for metric in METRICS:
        figure = page.locator(f'figure.chart[data-metric="{metric}"]')
        assert figure.count() == 1, metric
        assert figure.locator("svg").count() >= 1 and figure.locator("figcaption").inner_text()
    # The agent reports every second: its fps line has points by now (it stays live).
    page.wait_for_function(
        """() => [...document.querySelectorAll('figure.chart[data-metric="fps"] svg polyline')]
                 .some(p => p.points.length >= 2)"""
    )
    polylines = page.locator("figure.chart svg polyline")
    assert polylines.count() >= 3  # fps, latency, cpu at least
    with page.expect_navigation():
        page.click("#range-day")
    assert "range=day" in page.url
    day = page.locator('figure.chart[data-metric="fps"]')
    assert day.locator("svg").count() >= 1 and "day" in day.locator("figcaption").inner_text()
    # Events: a simulated device's start-up event.
    s.goto(f"/ui/devices/{sim_id(1)}")
    events = page.locator("#events li").all_inner_texts()
    assert any(SIM_EVENT in e for e in events), events


def _jpeg_in_page(s: Session, src: str) -> tuple[str, bytes]:
    """Fetch the snapshot image as the page does (its cookie): content type and bytes."""
    found: list[Any] = s.page.evaluate(
        """src => fetch(src).then(async r => [r.headers.get('content-type'),
                 Array.from(new Uint8Array(await r.arrayBuffer()))])""",
        src,
    )
    return str(found[0]), bytes(found[1])


def test_device_page_shows_the_latest_snapshot_with_the_box_on_the_face(
    session: Callable[..., Session], console: ConsoleStack
) -> None:
    s = session()
    page = s.login("viewer")
    s.goto(f"/ui/devices/{AGENT_ID}")
    # The agent sends one every 2 s once it sees a face; the page updates itself.
    img = page.locator(f'img.snapshot[data-stream="{AGENT_STREAM}"]')
    img.wait_for(timeout=40_000)
    img.scroll_into_view_if_needed()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=img.element_handle(), timeout=15_000
    )
    src = img.get_attribute("src") or ""
    assert src == f"/ui/devices/{AGENT_ID}/snapshots/{AGENT_STREAM}.jpg", src
    caption = page.locator("figure", has=img).locator("figcaption").inner_text()
    assert "detection" in caption, caption

    def consistent() -> tuple[bytes, dict[str, Any]] | None:
        """The JPEG and its record, taken between two updates (same size on both sides)."""
        kind, jpeg = _jpeg_in_page(s, src)
        assert kind.startswith("image/jpeg"), kind
        listed = console.api("viewer", f"/api/v1/devices/{AGENT_ID}/snapshots")
        records = listed["snapshots"] if isinstance(listed, dict) else listed
        record = next(r for r in records if r["stream"] == AGENT_STREAM)
        return (jpeg, record) if record["bytes"] == len(jpeg) else None

    jpeg, record = wait_for(consistent, timeout=20, what="a JPEG matching its record")
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] == record["width"]
    assert image.shape[0] == record["height"]
    assert record["detections"], record
    box = record["detections"][0]["box"]
    assert _green_on_outline(image, box) >= 0.8, (box, _green_on_outline(image, box))
    # The shipped model, run here on the snapshot, finds the face in that box.
    with load_detector(MANIFEST) as detector:
        found = detector.detect(image).detections
    assert found, "no face found in the snapshot"
    best = max(_iou(box, d.box) for d in found)
    assert best >= 0.5, (box, [d.box for d in found])
    s.screenshot("device")
