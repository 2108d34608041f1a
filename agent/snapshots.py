"""Camera snapshots (``[snapshots]``, off by default): the latest frame with a detection,
boxes and labels drawn, as a retained JPEG per stream.

The inference thread only calls :meth:`SnapshotWorker.offer` (a clock check and, at most once
per ``interval_s``, a reference to the frame put in a one-slot mailbox); drawing, JPEG
encoding and publishing run on the stream's snapshot thread, at a lower CPU priority, so a
slow encode never stalls inference. When that thread is still busy with the previous frame
when the next one is due, the pending frame is replaced by the newer one (counted
``skipped``).

A JPEG over ``max_bytes`` is encoded again at lower qualities (steps of 15, not below 30),
then at half the width and height; one still over is dropped (``too_large``). The
:class:`protocol.Snapshot` message goes to ``edgefleet/v1/{device}/snapshot/{stream}`` and,
for Home Assistant's MQTT camera, the raw JPEG to ``.../snapshot/{stream}/jpeg``; both
retained, so the latest wins and a new subscriber gets it at once.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import AgentConfig, SnapshotsConfig
from protocol import (
    SCHEMA_VERSION,
    Detection,
    ProtocolError,
    Snapshot,
    encode_checked,
    snapshot_jpeg_topic,
    snapshot_topic,
)
from protocol.limits import MAX_SNAPSHOT_DETECTIONS

log = logging.getLogger(__name__)

BOX_BGR = (0, 255, 0)
"""Colour of the boxes and label backgrounds (pure green, BGR)."""
TEXT_BGR = (0, 0, 0)
MIN_QUALITY = 30
QUALITY_STEP = 15
NICE = 10
"""How much lower the snapshot thread's CPU priority is than the inference thread's (Linux)."""
RESULTS = ("published", "too_large", "skipped")
"""Outcomes counted per stream (``edgefleet_agent_snapshots_total{result}``)."""

PublishFn = Callable[[str, bytes], None]
Image = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A JPEG within the cap, its size in pixels and the quality it took."""

    jpeg: bytes
    width: int
    height: int
    quality: int


def draw(image: Image, detections: Sequence[Detection]) -> Image:
    """A copy of ``image`` (BGR) with each detection's box and ``label score`` drawn."""
    import cv2

    out: Image = image.copy()
    height, width = out.shape[:2]
    thickness = max(2, round(min(width, height) / 160))
    scale = max(0.4, min(width, height) / 800)
    for d in detections:
        x0, y0, x1, y1 = d.box
        p0 = (round(x0 * (width - 1)), round(y0 * (height - 1)))
        p1 = (round(x1 * (width - 1)), round(y1 * (height - 1)))
        cv2.rectangle(out, p0, p1, BOX_BGR, thickness)
        text = f"{d.label} {d.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = p0[1] - th - base - 2 if p0[1] - th - base - 2 >= 0 else p0[1] + thickness
        cv2.rectangle(out, (p0[0], top), (p0[0] + tw + 4, top + th + base + 2), BOX_BGR, -1)
        org = (p0[0] + 2, top + th + 1)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_BGR, 1, cv2.LINE_AA)
    return out


def qualities(start: int) -> list[int]:
    """The JPEG qualities tried, best first: ``start``, then down by 15, ending at 30."""
    steps = list(range(start, MIN_QUALITY, -QUALITY_STEP))
    return [*steps, MIN_QUALITY] if not steps or steps[-1] != MIN_QUALITY else steps


def _full_then_half(image: Image) -> Iterator[Image]:
    """``image``, then (only when asked for) half its width and height."""
    import cv2

    yield image
    h, w = image.shape[:2]
    if w >= 2 and h >= 2:
        yield cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def encode_jpeg(image: Image, *, quality: int, max_bytes: int) -> Encoded | None:
    """The JPEG of ``image`` within ``max_bytes``: lower qualities first, then half the size
    (again from ``quality`` down); None when even that is over."""
    import cv2

    for scaled in _full_then_half(image):
        for q in qualities(quality):
            ok, buf = cv2.imencode(".jpg", scaled, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and buf.size <= max_bytes:
                h, w = scaled.shape[:2]
                return Encoded(jpeg=buf.tobytes(), width=int(w), height=int(h), quality=q)
    return None


@dataclass(frozen=True, slots=True)
class _Job:
    image: Image
    ts: float
    model: str | None
    detections: tuple[Detection, ...]


class SnapshotWorker:
    """Takes, encodes and publishes the snapshots of one stream on its own thread."""

    def __init__(
        self,
        *,
        device_id: str,
        stream: str,
        config: SnapshotsConfig,
        publish_retained: PublishFn,
        raw_jpeg: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``raw_jpeg``: also publish the image bytes (``[homeassistant] enabled``)."""
        self.stream = stream
        self._device_id = device_id
        self._config = config
        self._publish = publish_retained
        self._topic = snapshot_topic(device_id, stream)
        self._jpeg_topic = snapshot_jpeg_topic(device_id, stream) if raw_jpeg else None
        self._monotonic = monotonic
        self._next_due = float("-inf")
        self._cond = threading.Condition()
        self._slot: _Job | None = None
        self._stop = False
        self._counts: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name=f"snapshot-{stream}", daemon=True)

    def counts(self) -> dict[str, int]:
        """Snapshots by outcome (every key of :data:`RESULTS`)."""
        with self._cond:
            return {r: self._counts[r] for r in RESULTS}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread; a pending frame is dropped (nothing to flush: it is a snapshot)."""
        with self._cond:
            self._stop = True
            self._slot = None
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def offer(
        self, image: Image, ts: float, model: str | None, detections: Sequence[Detection]
    ) -> bool:
        """Called on the inference thread for each frame: take it as the next snapshot when
        it has a detection and ``interval_s`` passed since the last one taken. Cheap: the
        frame is only referenced (it is never written to), the work happens elsewhere."""
        if not detections:
            return False
        now = self._monotonic()
        if now < self._next_due:
            return False
        self._next_due = now + self._config.interval_s
        job = _Job(image, ts, model, tuple(detections[:MAX_SNAPSHOT_DETECTIONS]))
        with self._cond:
            if self._stop:
                return False
            if self._slot is not None:
                self._counts["skipped"] += 1
            self._slot = job
            self._cond.notify()
        return True

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: per-thread niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            with self._cond:
                while self._slot is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job, self._slot = self._slot, None
            assert job is not None
            try:
                result = self._take(job)
            except Exception:  # a snapshot must never stop the stream
                log.exception("stream %s: snapshot failed", self.stream)
                result = "skipped"
            with self._cond:
                self._counts[result] += 1

    def _take(self, job: _Job) -> str:
        cfg = self._config
        encoded = encode_jpeg(
            draw(job.image, job.detections), quality=cfg.quality, max_bytes=cfg.max_bytes
        )
        if encoded is None:
            log.warning(
                "stream %s: dropped a snapshot: its JPEG is over max_bytes=%d even at quality "
                "%d and half the size; raise [snapshots] max_bytes",
                self.stream,
                cfg.max_bytes,
                MIN_QUALITY,
            )
            return "too_large"
        message = Snapshot(
            schema=SCHEMA_VERSION,
            device_id=self._device_id,
            stream=self.stream,
            ts=job.ts,
            model=job.model,
            width=encoded.width,
            height=encoded.height,
            detections=list(job.detections),
            jpeg=base64.b64encode(encoded.jpeg).decode("ascii"),
        )
        try:
            payload = encode_checked(message)
        except ProtocolError as err:
            log.error("stream %s: snapshot outside the protocol's bounds: %s", self.stream, err)
            return "skipped"
        self._publish(self._topic, payload)
        if self._jpeg_topic is not None:
            self._publish(self._jpeg_topic, encoded.jpeg)
        return "published"


def snapshot_worker(
    config: AgentConfig, stream: str, publish_retained: PublishFn
) -> SnapshotWorker | None:
    """The worker of ``stream`` when ``[snapshots] enabled`` (publishing the raw JPEG too
    with ``[homeassistant] enabled``), else None."""
    if not config.snapshots.enabled:
        return None
    return SnapshotWorker(
        device_id=config.device_id,
        stream=stream,
        config=config.snapshots,
        publish_retained=publish_retained,
        raw_jpeg=config.homeassistant.enabled,
    )
