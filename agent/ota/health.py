"""Per-frame health samples of one stream, for the probation of a new model.

:class:`HealthRecorder` is the pipeline's :class:`~agent.pipeline.FrameObserver`: the
inference thread appends one small sample per frame (a lock and a deque append); the updater
reads the old model's recent window (the baseline) and the candidate's samples since the swap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from agent.ota.probation import FrameSample, Health, summarize

__all__ = ["HealthRecorder"]

CAPACITY = 1 << 15
"""Samples kept (about 18 minutes at 30 frames/s, 100 s at 300)."""


class HealthRecorder:
    """Thread-safe ring of :class:`FrameSample` of one stream."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, capacity: int = CAPACITY
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[FrameSample] = deque(maxlen=capacity)
        self._segment_start: float | None = None
        """When the model of the newest sample started producing samples without a break."""

    # -- FrameObserver (inference thread) ------------------------------------------------

    def frame(self, model: str, infer_ms: float, scores: Sequence[float]) -> None:
        self._add(FrameSample(self._clock(), model, infer_ms, tuple(scores)))

    def error(self, model: str) -> None:
        self._add(FrameSample(self._clock(), model, None))

    def _add(self, sample: FrameSample) -> None:
        with self._lock:
            if not self._samples or self._samples[-1].model != sample.model:
                self._segment_start = sample.t
            self._samples.append(sample)

    # -- readers -------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def baseline(self, model: str, window_s: float, until: float | None = None) -> Health:
        """What ``model`` did during the last ``window_s`` before ``until`` (default now),
        counted from when it last became the active model."""
        end = self._clock() if until is None else until
        with self._lock:
            start = end - window_s
            if self._samples and self._samples[-1].model == model:
                assert self._segment_start is not None
                start = max(start, self._segment_start)
            picked = self._pick(model, start, end)
            oldest = self._samples[0].t if self._samples else end
        start = max(start, min(oldest, end))
        return summarize(picked, seconds=end - start)

    def since(
        self, model: str, start: float, until: float | None = None, *, warmup: int = 0
    ) -> Health:
        """What ``model`` did after ``start`` until ``until`` (default now); ``warmup`` first
        frames are left out of the latency p95."""
        end = self._clock() if until is None else until
        with self._lock:
            picked = self._pick(model, start, end, after=True)
        return summarize(picked, seconds=end - start, warmup=warmup)

    def _pick(
        self, model: str, start: float, end: float, *, after: bool = False
    ) -> list[FrameSample]:
        """Samples of ``model`` in [start, end] (``after``: (start, end]), newest first walked."""
        picked = []
        for sample in reversed(self._samples):
            if sample.t < start or (after and sample.t == start):
                break
            if sample.t <= end and sample.model == model:
                picked.append(sample)
        picked.reverse()
        return picked
