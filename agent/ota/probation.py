"""Probation verdict: a new model's live health against the old model's baseline (pure).

The baseline is what the old model did on this stream just before the swap, the live health
what the candidate does during ``[ota] probation_s`` after it. Each check needs enough data on
both sides and is skipped otherwise (a camera showing nothing gives no detection-rate check):

=========================== ===================================================================
reason                      fails when
=========================== ===================================================================
``probation_errors``        live inference errors > ``max_errors`` (checked continuously)
``probation_latency``       live inference p95 > ``latency_factor`` × baseline p95 (a baseline
                            under ``latency_floor_ms`` counts as that floor: timer noise; both
                            need ``latency_min_frames``, the candidate's first
                            ``WARMUP_FRAMES`` do not count)
``probation_fps``           live frames/s < ``fps_factor`` × baseline frames/s
``probation_detection_rate`` live share of frames with a detection < ``detection_rate_factor`` ×
                            the baseline's (only when the baseline detected something)
``probation_score_drift``   PSI of the live detection scores against the baseline's >
                            ``psi_limit`` (both need ``min_scores`` detections)
=========================== ===================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.drift import DEFAULT_BINS, ScoreHistogram, psi

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
PROBATION_LATENCY = "probation_latency"
PROBATION_FPS = "probation_fps"
PROBATION_DETECTION_RATE = "probation_detection_rate"
PROBATION_SCORE_DRIFT = "probation_score_drift"

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
    latency_factor: float = 2.0
    fps_factor: float = 0.5
    detection_rate_factor: float = 0.5
    psi_limit: float = 0.5
    max_errors: int = 0
    min_frames: int = 20
    """Frames both sides need before fps and detection rate are compared."""
    latency_min_frames: int = 100
    """Frames both sides need before their inference p95 is compared (a p95 of fewer frames
    is mostly timer and scheduler noise)."""
    min_scores: int = 50
    """Detections both sides need before their score distributions are compared."""
    latency_floor_ms: float = 1.0


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


def _details(baseline: Health, live: Health, psi_value: float | None) -> dict[str, Number]:
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
        "baseline_detection_rate": r(baseline.detection_rate),
        "live_detection_rate": r(live.detection_rate),
        "baseline_scores": baseline.scores,
        "live_scores": live.scores,
        "psi": r(psi_value),
    }


def check_errors(baseline: Health, live: Health, t: Thresholds) -> Verdict | None:
    """The check that can fail before probation ends: too many inference errors."""
    if live.errors > t.max_errors:
        return Verdict(
            PROBATION_ERRORS,
            f"the new model raised {live.errors} inference error(s) in probation (at most "
            f"{t.max_errors} allowed); it was rolled back, check the agent log for the error",
            _details(baseline, live, None),
        )
    return None


def judge(baseline: Health, live: Health, t: Thresholds) -> Verdict:
    """The verdict at the end of probation: the first failing check, else ok."""
    psi_value = None
    if baseline.scores >= t.min_scores and live.scores >= t.min_scores:
        psi_value = psi(baseline.score_counts, live.score_counts)
    details = _details(baseline, live, psi_value)
    failed = check_errors(baseline, live, t)
    if failed is not None:
        return failed
    enough = baseline.frames >= t.min_frames
    if (
        baseline.frames >= t.latency_min_frames
        and live.frames >= t.latency_min_frames
        and baseline.infer_ms_p95 is not None
        and live.infer_ms_p95 is not None
    ):
        limit = t.latency_factor * max(baseline.infer_ms_p95, t.latency_floor_ms)
        if live.infer_ms_p95 > limit:
            return Verdict(
                PROBATION_LATENCY,
                f"inference p95 of the new model is {live.infer_ms_p95:.2f} ms, over "
                f"{t.latency_factor:g}x the old model's {baseline.infer_ms_p95:.2f} ms; it was "
                "rolled back: pick a model this device can run fast enough",
                details,
            )
    base_fps, live_fps = baseline.fps, live.fps
    if (
        enough
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
    base_rate, live_rate = baseline.detection_rate, live.detection_rate
    if (
        enough
        and live.frames >= t.min_frames
        and base_rate is not None
        and live_rate is not None
        and base_rate > 0
        and live_rate < t.detection_rate_factor * base_rate
    ):
        return Verdict(
            PROBATION_DETECTION_RATE,
            f"the new model detected something in {live_rate:.1%} of the frames, the old one "
            f"in {base_rate:.1%} (at least {t.detection_rate_factor:g}x that is required); it "
            "was rolled back: check its score threshold and that it suits this camera",
            details,
        )
    if psi_value is not None and psi_value > t.psi_limit:
        return Verdict(
            PROBATION_SCORE_DRIFT,
            f"the detection scores of the new model drifted from the old model's (PSI "
            f"{psi_value:.3f} > {t.psi_limit:g}); it was rolled back: compare both models on "
            "this camera's footage",
            details,
        )
    return Verdict(None, "the new model is as healthy as the old one", details)
