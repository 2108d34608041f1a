"""agent.ota.probation (pure verdicts from constructed numbers) and agent.ota.health."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.ota.health import HealthRecorder
from agent.ota.probation import (
    FrameSample,
    Health,
    Thresholds,
    check_errors,
    judge,
    percentile,
    summarize,
)
from tests.ota_support import FakeClock

T = Thresholds()


def health(
    *,
    seconds: float = 10.0,
    frames: int = 300,
    errors: int = 0,
    p95: float | None = 5.0,
    with_detection: int = 150,
    counts: tuple[int, ...] = (0,) * 10,
) -> Health:
    return Health(
        seconds=seconds,
        frames=frames,
        errors=errors,
        infer_ms_p95=p95,
        frames_with_detection=with_detection,
        score_counts=counts,
    )


SCORES = (0, 0, 0, 0, 0, 10, 20, 40, 60, 20)
"""150 detections, mostly 0.7-0.9."""


def test_identical_health_passes_with_numbers_for_both_sides() -> None:
    verdict = judge(health(counts=SCORES), health(counts=SCORES), T)
    assert verdict.ok and verdict.reason is None
    d = verdict.details
    assert d["baseline_fps"] == d["live_fps"] == 30.0
    assert d["baseline_infer_ms_p95"] == d["live_infer_ms_p95"] == 5.0


@pytest.mark.parametrize(
    ("live", "reason"),
    [
        (health(errors=1), "probation_errors"),
        (health(frames=149, with_detection=75), "probation_fps"),
    ],
)
def test_each_check_fails_just_past_its_threshold(live: Health, reason: str) -> None:
    verdict = judge(health(counts=SCORES), live, T)
    assert verdict.reason == reason
    assert verdict.message  # says what was measured and what happened


@pytest.mark.parametrize(
    "live",
    [
        health(p95=10.01),  # twice as slow over another stretch of time: load, not the model
        health(p95=100.0),
        health(with_detection=0),  # the room emptied after the swap
        health(counts=(60, 40, 20, 10, 0, 0, 0, 0, 0, 20)),  # another model's calibration
    ],
)
def test_unpaired_latency_detection_rate_and_score_drift_never_roll_back(live: Health) -> None:
    """Found from outside: good models were rolled back by PSI between two models and by a
    p95 measured while the host was busy; only paired evidence may judge those now."""
    assert judge(health(counts=SCORES), live, T).ok


def test_exactly_at_the_threshold_passes() -> None:
    assert judge(health(), health(frames=150, with_detection=75), T).ok  # exactly half the fps


def test_checks_are_ordered_errors_first() -> None:
    live = health(errors=3, p95=100.0, frames=10, with_detection=0)
    assert judge(health(), live, T).reason == "probation_errors"
    assert check_errors(health(), live, T) is not None
    assert check_errors(health(), health(errors=0), T) is None
    assert check_errors(health(), health(errors=2), Thresholds(max_errors=2)) is None


def test_too_few_frames_skip_the_frame_based_checks() -> None:
    few = health(frames=5, seconds=1.0, with_detection=5, p95=1.0)
    assert judge(few, health(p95=50.0, with_detection=0), T).ok


def test_a_model_that_stops_producing_frames_fails_fps() -> None:
    stuck = health(frames=0, with_detection=0, p95=None, seconds=2.0)
    assert judge(health(), stuck, T).reason == "probation_fps"


def test_fps_is_not_judged_before_the_baseline_rate_would_give_enough_frames() -> None:
    # 30 fps baseline, 0.5 s of live time would be 15 frames < min_frames (20): no verdict yet.
    short = health(frames=0, with_detection=0, p95=None, seconds=0.5)
    assert judge(health(), short, T).ok


def test_a_zero_fps_factor_disables_the_check() -> None:
    off = Thresholds(fps_factor=0.0)
    assert judge(health(), health(frames=30, with_detection=0), off).ok


def test_percentile_matches_numpy() -> None:
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 95) is None


def test_summarize_counts_frames_errors_detections_and_scores() -> None:
    samples = [
        FrameSample(0.0, "m", 1.0, (0.95,)),
        FrameSample(0.1, "m", 2.0, ()),
        FrameSample(0.2, "m", None),
        FrameSample(0.3, "m", 3.0, (0.55, 0.05)),
    ]
    h = summarize(samples, seconds=2.0)
    assert (h.frames, h.errors, h.frames_with_detection) == (3, 1, 2)
    assert h.fps == 1.5
    assert h.detection_rate == pytest.approx(2 / 3)
    assert h.score_counts[9] == 1 and h.score_counts[5] == 1 and h.score_counts[0] == 1
    assert h.infer_ms_p95 == pytest.approx(2.9)
    assert math.isclose(summarize([], seconds=0).fps or 0.0, 0.0)


def test_recorder_baseline_is_the_old_models_recent_window_and_since_the_new_ones() -> None:
    clock = FakeClock(0.0)
    rec = HealthRecorder(clock=clock)
    for _ in range(100):  # 10 s of the old model at 10 fps, a detection every other frame
        clock.advance(0.1)
        rec.frame("old@1", 2.0, (0.9,) if round(clock.t * 10) % 2 else ())
    swap_at = clock.t
    base = rec.baseline("old@1", 5.0)
    assert base.seconds == pytest.approx(5.0)
    assert base.frames in (50, 51)
    assert base.fps == pytest.approx(10.0, rel=0.05)
    for _ in range(20):
        clock.advance(0.1)
        rec.frame("new@2", 4.0, ())
    rec.error("new@2")
    live = rec.since("new@2", swap_at)
    assert (live.frames, live.errors, live.frames_with_detection) == (20, 1, 0)
    assert live.fps == pytest.approx(10.0)
    # Old samples do not leak into the new model's window and vice versa.
    assert rec.since("old@1", swap_at).frames == 0


def test_recorder_baseline_starts_when_the_model_last_became_active() -> None:
    clock = FakeClock(0.0)
    rec = HealthRecorder(clock=clock)
    for model, n in (("a@1", 30), ("b@2", 30), ("a@1", 10)):
        for _ in range(n):
            clock.advance(0.1)
            rec.frame(model, 1.0, ())
    base = rec.baseline("a@1", 60.0)
    assert base.frames == 10  # not the a@1 frames from before b@2 ran
    assert base.seconds == pytest.approx(1.0, abs=0.11)


def test_warmup_frames_do_not_count_towards_the_p95() -> None:
    samples = [FrameSample(i * 0.01, "m", 40.0 if i < 5 else 2.0) for i in range(100)]
    cold = summarize(samples, seconds=1.0).infer_ms_p95
    assert cold is not None and cold > 3.0  # the 5 cold invokes pull the p95 up
    warm = summarize(samples, seconds=1.0, warmup=5)
    assert warm.infer_ms_p95 == pytest.approx(2.0) and warm.frames == 100
