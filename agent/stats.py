"""Per-stream counters and latency windows, shared by telemetry and /metrics.

The inference thread records one frame at a time (cheap: a lock, two appends); readers
take consistent snapshots.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

WINDOW = 1024


@dataclass(frozen=True, slots=True)
class StreamSnapshot:
    frames_processed: int
    detections: int
    errors: int
    infer_ms_p50: float | None
    infer_ms_p95: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    infer_seconds_total: float
    last_progress: float
    """time.monotonic() of the last finished inference (0.0 before the first)."""


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95])
    return round(float(p50), 3), round(float(p95), 3)


class StreamStats:
    """Thread-safe counters for one stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processed = 0
        self._detections = 0
        self._errors = 0
        self._infer_total = 0.0
        self._infer_ms: deque[float] = deque(maxlen=WINDOW)
        self._latency_ms: deque[float] = deque(maxlen=WINDOW)
        self._last_progress = 0.0

    def record(self, *, infer_ms: float, latency_ms: float, detections: int) -> None:
        with self._lock:
            self._processed += 1
            self._detections += detections
            self._infer_total += infer_ms / 1000.0
            self._infer_ms.append(infer_ms)
            self._latency_ms.append(latency_ms)
            self._last_progress = time.monotonic()

    @property
    def frames_processed(self) -> int:
        """Cheap read (no percentiles), for polling."""
        return self._processed

    def record_error(self) -> None:
        with self._lock:
            self._errors += 1

    def snapshot(self, *, reset_window: bool = False) -> StreamSnapshot:
        """Counters plus percentiles over the frames since the last ``reset_window``."""
        with self._lock:
            infer = list(self._infer_ms)
            latency = list(self._latency_ms)
            if reset_window:
                self._infer_ms.clear()
                self._latency_ms.clear()
            processed, detections, errors = self._processed, self._detections, self._errors
            infer_total, last = self._infer_total, self._last_progress
        i50, i95 = _percentiles(infer)
        l50, l95 = _percentiles(latency)
        return StreamSnapshot(
            frames_processed=processed,
            detections=detections,
            errors=errors,
            infer_ms_p50=i50,
            infer_ms_p95=i95,
            latency_ms_p50=l50,
            latency_ms_p95=l95,
            infer_seconds_total=infer_total,
            last_progress=last,
        )
