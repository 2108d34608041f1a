"""Probation verdict after the swap: what pairing cannot see (pure).

The paired comparison with the old model (agreement, latency) continues during probation in
:mod:`agent.ota.gate`; this module judges the rest, the candidate's own live health against
the old model's just before the swap:

=========================== ===================================================================
reason                      fails when
=========================== ===================================================================
``probation_errors``        live inference errors > ``max_errors`` (checked continuously)
``probation_fps``           live frames/s < ``fps_factor`` x baseline frames/s (a collapse of
                            the stream's frame rate; the camera sets the rate, not the scene)
=========================== ===================================================================

Latency, detection rate and score distributions of two different models over two different
stretches of time are *not* compared: host load and the scene change between them (docs/ota.md,
"The health gate"). The score PSI stays a drift KPI of one model against its own baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.drift import DEFAULT_BINS, ScoreHistogram

__all__ = [
    "FrameSample",
    "Health",
    "Thresholds",
    "Verdict",
    "check_errors",
    "judge",
    "percentile",
    "summarize",
]

PROBATION_ERRORS = "probation_errors"
PROBATION_FPS = "probation_fps"

Number = str | int | float | bool | None

WARMUP_FRAMES = 5
"""The candidate's first frames after the swap, left out of its latency p95."""


@dataclass(frozen=True, slots=True)
class FrameSample:
    """One inferred frame: when (monotonic s), which model, how long, the detection scores."""

    t: float
    model: str
    infer_ms: float | None
    """None: the inference raised (an error)."""
    scores: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Health:
    """What a model did on the stream over ``seconds``."""

    seconds: float
    frames: int
    """Frames inferred without error."""
    errors: int
    infer_ms_p95: float | None
    frames_with_detection: int
    score_counts: tuple[int, ...] = field(default=(0,) * DEFAULT_BINS)

    @property
    def fps(self) -> float | None:
        return self.frames / self.seconds if self.seconds > 0 else None

    @property
    def detection_rate(self) -> float | None:
        """Share of frames with at least one detection."""
        return self.frames_with_detection / self.frames if self.frames else None

    @property
    def scores(self) -> int:
        return sum(self.score_counts)


@dataclass(frozen=True, slots=True)
class Thresholds:
    fps_factor: float = 0.5
    max_errors: int = 0
    min_frames: int = 20
    """Frames both sides need before their fps are compared."""


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str | None
    """None: the candidate passed; else a ``probation_*`` code."""
    message: str
    details: dict[str, Number]
    """Measured numbers next to the baseline's (for events)."""

    @property
    def ok(self) -> bool:
        return self.reason is None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(
    samples: Iterable[FrameSample], *, seconds: float, bins: int = DEFAULT_BINS, warmup: int = 0
) -> Health:
    """Health of ``samples`` observed over ``seconds``.

    ``warmup``: the first that many inferred frames do not count towards the latency p95 (a
    freshly loaded interpreter is slower on its first invokes); they count everywhere else.
    """
    infer: list[float] = []
    errors = 0
    with_detection = 0
    histogram = ScoreHistogram(bins)
    for sample in samples:
        if sample.infer_ms is None:
            errors += 1
            continue
        infer.append(sample.infer_ms)
        if sample.scores:
            with_detection += 1
            histogram.add_many(sample.scores)
    p95 = percentile(infer[warmup:], 95)
    return Health(
        seconds=max(0.0, seconds),
        frames=len(infer),
        errors=errors,
        infer_ms_p95=round(p95, 3) if p95 is not None else None,
        frames_with_detection=with_detection,
        score_counts=histogram.counts,
    )


def _details(baseline: Health, live: Health) -> dict[str, Number]:
    def r(value: float | None) -> float | None:
        return round(value, 3) if value is not None else None

    return {
        "baseline_frames": baseline.frames,
        "live_frames": live.frames,
        "baseline_errors": baseline.errors,
        "live_errors": live.errors,
        "baseline_fps": r(baseline.fps),
        "live_fps": r(live.fps),
        "baseline_infer_ms_p95": baseline.infer_ms_p95,
        "live_infer_ms_p95": live.infer_ms_p95,
    }


def check_errors(baseline: Health, live: Health, t: Thresholds) -> Verdict | None:
    """The check that can fail before probation ends: too many inference errors."""
    if live.errors > t.max_errors:
        return Verdict(
            PROBATION_ERRORS,
            f"the new model raised {live.errors} inference error(s) in probation (at most "
            f"{t.max_errors} allowed); it was rolled back, check the agent log for the error",
            _details(baseline, live),
        )
    return None


def judge(baseline: Health, live: Health, t: Thresholds) -> Verdict:
    """The verdict at the end of probation: errors, then a frame-rate collapse, else ok."""
    details = _details(baseline, live)
    failed = check_errors(baseline, live, t)
    if failed is not None:
        return failed
    base_fps, live_fps = baseline.fps, live.fps
    if (
        baseline.frames >= t.min_frames
        and base_fps is not None
        and live_fps is not None
        and live.seconds * base_fps >= t.min_frames  # long enough to tell
        and live_fps < t.fps_factor * base_fps
    ):
        return Verdict(
            PROBATION_FPS,
            f"the new model processed {live_fps:.1f} frames/s, under {t.fps_factor:g}x the "
            f"old model's {base_fps:.1f}; it was rolled back: it is too slow for this stream",
            details,
        )
    return Verdict(None, "the new model kept the stream healthy", details)
