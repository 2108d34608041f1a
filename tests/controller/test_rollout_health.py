"""The canary health comparison (controller.rollouts.health, docs/ota.md "Health comparison"):
each device's change before/after the canaries' change point, canaries against devices not
yet updated over the same windows (difference in differences), thresholds, and "not enough
evidence" instead of an abort."""

from __future__ import annotations

from typing import Any

import pytest

from controller.rollouts.health import (
    ChangeWindows,
    DeviceChange,
    HealthPolicy,
    StreamHealth,
    Window,
    change_windows,
    control_windows,
    device_change,
    judge,
    stream_health,
    telemetry_queries,
)

P = HealthPolicy()


def _sample(ts: float, **stream: Any) -> tuple[float, list[dict[str, Any]]]:
    return ts, [{"name": "cam0", **stream}, {"name": "other", "fps": 1.0, "infer_ms_p95": 99.0}]


def _h(lat: float | None = 3.0, fps: float | None = 25.0, err: float | None = 0.0) -> StreamHealth:
    return StreamHealth(latency_ms=lat, fps=fps, error_rate=err, samples=3)


def _change(before: StreamHealth, after: StreamHealth) -> DeviceChange:
    return DeviceChange(before=before, after=after)


def _same(n: int, before: StreamHealth, after: StreamHealth | None = None) -> list[DeviceChange]:
    return [_change(before, after or before)] * n


# --- one device, windows --------------------------------------------------------------------


def test_stream_health_uses_only_its_stream_and_window_and_survives_counter_resets() -> None:
    samples = [
        _sample(10, fps=20, infer_ms_p95=3, frames_processed=100, errors=0),
        _sample(20, fps=22, infer_ms_p95=4, frames_processed=300, errors=10),
        _sample(30, fps=24, infer_ms_p95=5, frames_processed=40, errors=2),  # agent restarted
        _sample(40, fps=1, infer_ms_p95=50, frames_processed=50, errors=2),
    ]
    h = stream_health(samples, "cam0", since=0, until=40, min_samples=2)
    assert h == StreamHealth(latency_ms=4, fps=22, error_rate=12 / (240 + 12), samples=3)
    assert stream_health(samples, "cam0", since=25, until=40, min_samples=2) is None
    assert stream_health(samples, "cam0", since=25, min_samples=2) is not None  # open end
    assert stream_health(samples, "nope", since=0, min_samples=1) is None


def test_windows_end_at_the_assignment_start_at_success_and_controls_use_the_median() -> None:
    w = change_windows(P, assigned_at=1000, done_at=1030, now=1100)
    assert w == ChangeWindows(before=Window(700, 1000), after=Window(1030, None))
    # Long after the swap the after window is the last window_s, like the before window.
    assert change_windows(P, assigned_at=1000, done_at=1030, now=5000).after == Window(4700, None)
    # Devices not updated: the canaries' median change point, the same calendar time.
    control = control_windows(P, [(1000, 1030), (1000, 1050), (1200, 1260)], now=1300)
    assert control == ChangeWindows(before=Window(700, 1000), after=Window(1050, None))


def test_telemetry_is_read_once_per_stage_window_not_since_the_first_stage() -> None:
    stage1 = change_windows(P, assigned_at=1000, done_at=1010, now=9000)
    stage2a = change_windows(P, assigned_at=8000, done_at=8020, now=9000)
    stage2b = change_windows(P, assigned_at=8000, done_at=8900, now=9000)
    queries = telemetry_queries([("d2", stage2b), ("d0", stage1), ("d1", stage2a)])
    assert queries == [
        (["d1", "d2"], 7700, 8000),
        (["d1", "d2"], 8700, None),
        (["d0"], 700, 1000),
        (["d0"], 8700, None),
    ]


def test_a_device_needs_enough_samples_before_and_after_its_change() -> None:
    w = change_windows(P, assigned_at=1000, done_at=1030, now=1100)
    before = [_sample(ts, infer_ms_p95=1.6) for ts in (900, 950, 990)]
    during = [_sample(1010, infer_ms_p95=99.0)]  # the deployment itself is in neither window
    after = [_sample(ts, infer_ms_p95=5.0) for ts in (1040, 1050, 1060)]
    assert device_change(before + during + after[:2], "cam0", w, min_samples=3) is None
    assert device_change(before[1:] + during + after, "cam0", w, min_samples=3) is None
    change = device_change(before + during + after, "cam0", w, min_samples=3)
    assert change is not None
    assert (change.before.latency_ms, change.after.latency_ms) == (1.6, 5.0)


# --- the comparison -------------------------------------------------------------------------


def test_a_fleet_wide_spike_at_the_canary_change_cancels_out() -> None:
    """The incident: a machine-wide CPU spike hit every device right after the canary's swap."""
    verdict = judge(P, _same(1, _h(1.6), _h(6.4)), _same(9, _h(1.6), _h(6.4)))
    assert verdict.outcome == "healthy"


def test_only_the_canary_getting_worse_is_a_regression_in_words_an_operator_reads() -> None:
    verdict = judge(P, _same(1, _h(1.6), _h(5.0)), _same(9, _h(1.6)))
    assert verdict.outcome == "regression"
    assert verdict.detail == (
        "canary inference p95 rose 3.1x after the update (1.6 -> 5.0 ms) while the 9 devices "
        "not updated changed 1.0x over the same window"
    )
    several = judge(P, _same(3, _h(1.6), _h(5.0)), _same(1, _h(1.6)) * 2)
    assert several.detail.startswith("the 3 updated devices' inference p95 rose 3.1x")


def test_a_canary_worse_by_more_than_a_fleet_wide_spike_is_still_a_regression() -> None:
    verdict = judge(P, _same(1, _h(1.6), _h(11.2)), _same(9, _h(1.6), _h(6.4)))
    assert verdict.outcome == "regression"
    assert "rose 7.0x after the update (1.6 -> 11.2 ms)" in verdict.detail
    assert "the 9 devices not updated changed 4.0x" in verdict.detail


def test_latency_needs_both_the_relative_and_the_absolute_excess() -> None:
    controls = [_change(_h(3.0), _h(3.0)), _change(_h(3.2), _h(3.2)), _change(_h(2.9), _h(2.9))]
    assert judge(P, _same(1, _h(3.0), _h(4.4)), controls).outcome == "healthy"  # 1.47x
    assert judge(P, _same(1, _h(3.0), _h(4.6)), controls).outcome == "regression"  # 1.53x
    # 1.55x but only 0.5 ms above what the controls' change predicts.
    assert judge(P, _same(1, _h(0.9), _h(1.4)), _same(3, _h(0.9))).outcome == "healthy"


@pytest.mark.parametrize(
    ("before", "slightly", "worse", "detail"),
    [
        (
            _h(fps=25.0),
            _h(fps=17.0),
            _h(fps=16.0),
            "canary fps fell to 0.64x after the update (25.0 -> 16.0 fps) while the 5 devices "
            "not updated changed 1.00x over the same window",
        ),
        (
            _h(err=0.0),
            _h(err=0.01),
            _h(err=0.03),
            "canary errors rose from 0.0% to 3.0% of frames after the update while the 5 devices "
            "not updated changed +0.0 points over the same window",
        ),
    ],
    ids=["fps", "errors"],
)
def test_a_change_only_on_the_canary_is_a_regression_and_a_fleet_wide_one_is_not(
    before: StreamHealth, slightly: StreamHealth, worse: StreamHealth, detail: str
) -> None:
    controls = _same(5, before)
    assert judge(P, _same(1, before, slightly), controls).outcome == "healthy"
    verdict = judge(P, _same(1, before, worse), controls)
    assert (verdict.outcome, verdict.detail) == ("regression", detail)
    fleet_wide = _same(5, before, worse)
    assert judge(P, _same(1, before, worse), fleet_wide).outcome == "healthy"


def test_streams_under_min_fps_are_not_compared() -> None:
    idle = judge(P, _same(1, _h(fps=0.5), _h(fps=0.2)), _same(5, _h(fps=0.5)))
    assert idle.outcome == "healthy"


def test_an_error_rise_is_a_regression_at_twice_what_the_fleet_wide_rise_predicts() -> None:
    fleet_wide = _same(5, _h(err=0.0), _h(err=0.03))
    # 5% against the 3% the fleet-wide rise predicts: not 2x; 7% is.
    assert judge(P, _same(1, _h(err=0.0), _h(err=0.05)), fleet_wide).outcome == "healthy"
    assert judge(P, _same(1, _h(err=0.0), _h(err=0.07)), fleet_wide).outcome == "regression"


def test_too_few_devices_with_enough_samples_is_not_enough_evidence_not_an_abort() -> None:
    worse = _same(1, _h(1.6), _h(9.0))
    assert judge(P, [], _same(9, _h(1.6))).outcome == "insufficient"
    lonely = judge(P, worse, _same(1, _h(1.6)))
    assert lonely.outcome == "insufficient"
    assert lonely.detail == (
        "not enough evidence: 1 updated and 1 not updated devices have 3 samples before and "
        "after the change (need 1 and 2)"
    )
    assert judge(P, worse, _same(2, _h(1.6))).outcome == "regression"
    assert judge(P, _same(1, _h(None, None, None)), _same(3, _h())).outcome == "healthy"
