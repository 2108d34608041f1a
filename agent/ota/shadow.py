"""Shadow evaluation: a second model on a sample of the live frames, back to back.

A :class:`ShadowRunner` is attached to a stream's pipeline (``StreamPipeline.set_shadow``).
After the active model inferred a frame, the runner decides whether this frame is paired: at
least ``interval_s`` after the last pair (consecutive frames are near copies, so spacing them
out makes each pair more independent evidence) and within its CPU share (after a shadow
inference of t ms the next waits ``t * (1 - share) / share``). A paired frame goes through
the other model right before or right after the active one (they take turns, so neither
always finds the caches warm), on the same preprocessed tensor when both models take the same
input (else its own preprocessing of the same image), so host load and the scene hit both
alike. The active model's result is published as usual; the shadow's is only compared.

Before the swap the candidate is the shadow; during probation the old model is, and the
same :class:`PairLog` keeps collecting, always oriented candidate against current.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from agent.ota.gate import Pair, match_boxes
from inference.backends.base import TensorInfo
from inference.detector import Detector, InferenceResult, Prepared

__all__ = ["PairLog", "ShadowOutcome", "ShadowRunner"]

log = logging.getLogger(__name__)

MAX_PAIRS = 20_000
"""Pairs kept (over an hour at the default spacing)."""


class PairLog:
    """Thread-safe list of :class:`Pair`, appended by the inference thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: list[Pair] = []

    def add(self, pair: Pair) -> None:
        with self._lock:
            if len(self._pairs) < MAX_PAIRS:
                self._pairs.append(pair)

    def snapshot(self) -> list[Pair]:
        with self._lock:
            return list(self._pairs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pairs)


@dataclass(frozen=True, slots=True)
class ShadowOutcome:
    """The shadow model on one frame: its result, its inference time (None: it raised or its
    outputs were not finite) and the time the whole shadow step took."""

    result: InferenceResult
    infer_ms: float | None
    spent_s: float

    @property
    def cpu_ms(self) -> float | None:
        return self.result.cpu_ms if self.infer_ms is not None else None


class ShadowRunner:
    """Runs ``shadow`` on sampled frames after the active model (inference thread only)."""

    def __init__(
        self,
        shadow: Detector,
        log_: PairLog,
        *,
        shadow_is_candidate: bool,
        interval_s: float,
        cpu_share: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shadow = shadow
        self.pairs = log_
        self._candidate = shadow_is_candidate
        self._interval_s = interval_s
        self._share = min(max(cpu_share, 0.01), 1.0)
        self._clock = clock
        self._next_at = 0.0
        self._turn = False

    def due(self) -> bool:
        return self._clock() >= self._next_at

    def leads(self) -> bool:
        """Whether the shadow model runs before the active one on this paired frame: they take
        turns, so neither always finds the caches warm from the other (measured: the same
        bytes run second looked 0.43x as slow)."""
        self._turn = not self._turn
        return self._turn

    def run(self, image: npt.NDArray[Any], active: Detector, prepared: Prepared) -> ShadowOutcome:
        """Infer the frame with the shadow model; its failure is evidence, never the stream's."""
        start = time.perf_counter()
        try:
            tensor = prepared if _same_input(active, self.shadow) else self.shadow.preprocess(image)
            other = self.shadow.infer(tensor)
            infer_ms = None if self.shadow.nonfinite_outputs() else other.infer_ms
        except Exception as err:  # noqa: BLE001 - the shadow's failure is evidence
            log.warning("shadow model %s failed on a frame: %s", self.shadow.ref, err)
            other, infer_ms = InferenceResult(detections=[], infer_ms=0.0), None
        return ShadowOutcome(other, infer_ms, time.perf_counter() - start)

    def record(self, result: InferenceResult, shadow: ShadowOutcome) -> None:
        """Record the pair of the active model's ``result`` and the shadow's outcome."""
        now = self._clock()
        spent = shadow.spent_s
        self._next_at = now + max(self._interval_s, spent * (1.0 - self._share) / self._share)
        if self._candidate:
            current, candidate = result, shadow.result
            current_ms, candidate_ms = result.infer_ms, shadow.infer_ms
            current_cpu, candidate_cpu = result.cpu_ms, shadow.cpu_ms
        else:
            if shadow.infer_ms is None:
                return  # the old model failed: no evidence about the candidate
            current, candidate = shadow.result, result
            current_ms, candidate_ms = shadow.infer_ms, result.infer_ms
            current_cpu, candidate_cpu = shadow.cpu_ms, result.cpu_ms
        if candidate_ms is None:
            self.pairs.add(Pair(now, len(current.detections), 0, 0, current_ms, None))
            return
        matches = match_boxes(current.detections, candidate.detections)
        self.pairs.add(
            Pair(
                t=now,
                current_boxes=len(current.detections),
                candidate_boxes=len(candidate.detections),
                matched=len(matches),
                current_ms=current_ms,
                candidate_ms=candidate_ms,
                score_shift=tuple(round(b.score - a.score, 4) for a, b in matches),
                current_cpu_ms=current_cpu,
                candidate_cpu_ms=candidate_cpu,
            )
        )

    def pair(
        self, image: npt.NDArray[Any], active: Detector, prepared: Prepared, result: InferenceResult
    ) -> None:
        """Run the shadow after the active model's ``result`` and record the pair."""
        self.record(result, self.run(image, active, prepared))


def _same_input(a: Detector, b: Detector) -> bool:
    """Both models take the very same tensor for a frame."""
    pa, pb = a.preprocessor, b.preprocessor
    return (
        pa.spec == pb.spec
        and tuple(pa.info.shape) == tuple(pb.info.shape)
        and str(pa.info.dtype) == str(pb.info.dtype)
        and _quant(pa.info) == _quant(pb.info)
    )


def _quant(info: TensorInfo) -> tuple[float, float]:
    return (float(info.scale or 0.0), float(info.zero_point or 0))
