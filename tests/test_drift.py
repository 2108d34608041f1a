"""Score histograms, PSI and the per-stream drift monitor (agent.drift)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.drift import (
    SIGNIFICANT_PSI,
    DriftError,
    DriftMonitor,
    ScoreHistogram,
    StreamDrift,
    psi,
)


def _scores(rng: np.random.Generator, mean: float, n: int) -> list[float]:
    return [float(s) for s in np.clip(rng.normal(mean, 0.08, n), 0.0, 1.0)]


def test_histogram_puts_scores_in_equal_width_bins_with_edges_clamped() -> None:
    h = ScoreHistogram(bins=10)
    for score in (0.0, 0.05, 0.1, 0.55, 0.99, 1.0, -0.2, 1.7):
        h.add(score)
    assert h.counts == (3, 1, 0, 0, 0, 1, 0, 0, 0, 3)
    assert h.total == 8


def test_psi_matches_a_hand_computed_value() -> None:
    # e = (0.5, 0.5), a = (0.25, 0.75):
    # (0.25-0.5)*ln(0.25/0.5) + (0.75-0.5)*ln(0.75/0.5) = 0.25*ln2 + 0.25*ln1.5
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(expected, rel=1e-12)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.2746530722, rel=1e-9)


def test_psi_of_identical_distributions_is_zero() -> None:
    counts = [3, 10, 40, 120, 300, 200, 80, 30, 8, 1]
    assert psi(counts, counts) == pytest.approx(0.0, abs=1e-12)
    # proportions matter, not totals
    assert psi(counts, [c * 7 for c in counts]) == pytest.approx(0.0, abs=1e-12)


_COUNTS = st.lists(st.integers(0, 10_000), min_size=10, max_size=10).filter(lambda c: sum(c) > 0)


@given(_COUNTS, _COUNTS)
def test_psi_is_never_negative_and_symmetric(expected: list[int], actual: list[int]) -> None:
    value = psi(expected, actual)
    assert value >= 0.0
    assert value == pytest.approx(psi(actual, expected), rel=1e-9, abs=1e-12)


def test_psi_smooths_empty_bins_to_a_finite_value() -> None:
    value = psi([100, 0], [50, 50], eps=1e-4)
    assert math.isfinite(value)
    assert value > SIGNIFICANT_PSI


def test_psi_rejects_mismatched_or_empty_histograms() -> None:
    with pytest.raises(DriftError, match="same number of bins"):
        psi([1, 2, 3], [1, 2])
    with pytest.raises(DriftError, match="empty histogram"):
        psi([0, 0], [1, 1])


def test_monitor_reports_no_drift_for_the_same_score_distribution() -> None:
    rng = np.random.default_rng(1)
    mon = DriftMonitor(window=2000, baseline_size=5000)
    mon.observe(_scores(rng, 0.75, 5000))
    assert mon.baseline_counts is not None
    assert mon.psi() is None  # window still empty
    mon.observe(_scores(rng, 0.75, 2000))
    value = mon.psi()
    assert value is not None
    assert value < 0.02


def test_monitor_flags_a_shifted_score_distribution_as_significant() -> None:
    rng = np.random.default_rng(2)
    mon = DriftMonitor(window=1000, baseline_size=3000)
    mon.observe(_scores(rng, 0.8, 3000))
    mon.observe(_scores(rng, 0.55, 1000))
    value = mon.psi()
    assert value is not None
    assert value > SIGNIFICANT_PSI


def test_monitor_window_slides_so_old_scores_stop_counting() -> None:
    rng = np.random.default_rng(3)
    mon = DriftMonitor(window=500, baseline_size=2000)
    mon.observe(_scores(rng, 0.8, 2000))
    mon.observe(_scores(rng, 0.4, 500))
    drifted = mon.psi()
    assert drifted is not None and drifted > SIGNIFICANT_PSI
    mon.observe(_scores(rng, 0.8, 500))  # the scene is back to normal
    assert sum(mon.recent_counts) == 500
    recovered = mon.psi()
    assert recovered is not None and recovered < 0.05


def test_monitor_uses_a_provided_baseline_and_reset_learns_a_new_one() -> None:
    baseline = [0, 0, 0, 0, 0, 0, 0, 10, 80, 10]
    mon = DriftMonitor(baseline, window=100)
    assert mon.baseline_counts == tuple(baseline)
    mon.observe([0.85] * 80 + [0.75] * 10 + [0.95] * 10)
    first = mon.psi()
    assert first is not None and first == pytest.approx(0.0, abs=1e-12)

    mon.reset()  # new model: learn the baseline from its first detections
    assert mon.baseline_counts is None
    assert mon.psi() is None
    mon.observe([0.35] * 100)  # baseline
    mon.observe([0.35] * 100)  # window
    assert mon.baseline_counts == (0, 0, 0, 100, 0, 0, 0, 0, 0, 0)
    second = mon.psi()
    assert second is not None and second == pytest.approx(0.0, abs=1e-12)


def test_monitor_rejects_a_baseline_with_the_wrong_number_of_bins() -> None:
    with pytest.raises(DriftError, match="bins"):
        DriftMonitor([1, 2, 3], window=10)


def _feed(drift: StreamDrift, model: str, scores: list[float]) -> None:
    for score in scores:
        drift.frame(model, 1.0, [score])


def test_stream_drift_learns_and_stores_the_active_models_baseline(tmp_path: Path) -> None:
    path = tmp_path / "drift" / "front.json"  # the folder is made when first needed
    drift = StreamDrift(baseline_path=path, window=20, baseline_size=40)
    _feed(drift, "m@1", [0.91, 0.95] * 20)
    assert drift.psi() is None, "no recent window yet"
    stored = json.loads(path.read_text())
    assert stored["model"] == "m@1" and sum(stored["counts"]) == 40
    _feed(drift, "m@1", [0.91, 0.95] * 10)
    same = drift.psi()
    assert same is not None and same < 0.1
    _feed(drift, "m@1", [0.55] * 20)
    shifted = drift.psi()
    assert shifted is not None and shifted > SIGNIFICANT_PSI


def test_stream_drift_keeps_the_baseline_across_a_restart_with_the_same_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "front.json"
    _feed(StreamDrift(baseline_path=path, window=20, baseline_size=40), "m@1", [0.92] * 40)
    restarted = StreamDrift(baseline_path=path, window=20, baseline_size=40)
    _feed(restarted, "m@1", [0.55] * 20)  # compared at once: nothing relearned
    value = restarted.psi()
    assert value is not None and value > SIGNIFICANT_PSI


def test_stream_drift_starts_over_when_another_model_becomes_active(tmp_path: Path) -> None:
    path = tmp_path / "front.json"
    drift = StreamDrift(baseline_path=path, window=20, baseline_size=40)
    _feed(drift, "m@1", [0.92] * 60)
    assert drift.psi() is not None
    _feed(drift, "m@2", [0.55] * 20)
    assert drift.psi() is None, "m@2 learns its own baseline first"
    _feed(drift, "m@2", [0.55] * 40)
    value = drift.psi()
    assert value is not None and value < 0.1
    assert json.loads(path.read_text())["model"] == "m@2"


@pytest.mark.parametrize("content", ["not json", '{"schema": 1, "model": "m@1", "counts": [1]}'])
def test_stream_drift_relearns_over_a_broken_baseline_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "front.json"
    path.write_text(content)
    drift = StreamDrift(baseline_path=path, window=10, baseline_size=10)
    _feed(drift, "m@1", [0.9] * 20)
    value = drift.psi()
    assert value is not None and value < 0.1
    assert sum(json.loads(path.read_text())["counts"]) == 10
