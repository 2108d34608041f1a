"""The health gate's latency check measures the models, not the host around them.

Found in CI: the demo's INT8 rollout stayed in the shadow phase past its 90 s timeout on a
loaded machine ("median latency 1.78x (95% CI 0.78-3.61x)" over 36 paired frames). The
paired times were wall-clock times around ``invoke()``. The runtime releases the interpreter
lock while it computes, so the inference thread then waits for the lock (up to the 5 ms
switch interval) whenever another thread of the agent holds it, and for a core whenever other
processes hold both: a 1-2 ms invoke measured 6-11 ms, the ratio of two models drifted to 1
and its interval widened. A model twice as slow could pass, and a good one went undecided.

These tests pair real LiteRT models on the real ``ShadowRunner`` while another thread of this
process keeps the interpreter lock busy, as the agent's camera, MQTT and HTTP threads do.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.ota.gate import GateRules, Pair, evaluate
from agent.ota.shadow import PairLog, ShadowRunner
from inference.detector import Detector, load_detector
from tests.video_files import shipped_frames

PAIRS = 60
"""Paired frames per run: 12 blocks at the runner's 5 pairs per block below."""


class _Clock:
    """Pairs 0.2 s apart (the default spacing) without waiting for them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _busy_interpreter() -> Callable[[], None]:
    """Start a thread that holds the interpreter lock whenever it can (pure Python work);
    returns its stop."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin, name="busy", daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join(5)

    return stopper


def _quiet_ms(detectors: list[Detector], image: np.ndarray) -> list[float]:
    """Each detector's median invoke time, nothing else running in this process (the baseline
    from the same run: the models' speeds depend on the CPU's instructions). CPU times where
    the backend reports them, as the gate compares: the wall clock also measured the other
    pytest worker on a loaded machine."""
    times: list[list[float]] = [[] for _ in detectors]
    inputs = [d.preprocess(image) for d in detectors]
    order = list(range(len(detectors)))
    for run in range(90):
        for i in order if run % 2 else order[::-1]:
            result = detectors[i].infer(inputs[i])
            if run >= 10:  # warmed up
                cpu_ms = result.cpu_ms
                times[i].append(result.infer_ms if cpu_ms is None else cpu_ms)
    return [statistics.median(t) for t in times]


def _pair(current: Detector, candidate: Detector, frames: list[np.ndarray]) -> PairLog:
    clock = _Clock()
    log = PairLog()
    runner = ShadowRunner(
        candidate, log, shadow_is_candidate=True, interval_s=0.2, cpu_share=1.0, clock=clock
    )
    for i in range(PAIRS):
        image = frames[i % len(frames)]
        prepared = current.preprocess(image)
        ahead = runner.run(image, current, prepared) if runner.leads() else None
        result = current.infer(prepared)
        runner.record(result, ahead if ahead is not None else runner.run(image, current, prepared))
        clock.now += 0.2
    return log


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return shipped_frames(10)


def test_a_slower_model_is_measured_as_slow_while_the_interpreter_is_busy(
    assets: Path, frames: list[np.ndarray]
) -> None:
    """The fastest of the shipped models as the current one, the slowest as the candidate:
    which are which depends on the CPU (with VNNI the ONNX model is 1.9x the INT8 one; without,
    the INT8 one is the slowest, 1.5x the fp16 one, and INT8 and ONNX are within 0.8-1.0x).
    With wall-clock pairs a 1.6x ratio measured 1.13x."""
    models = [
        load_detector(assets / f"blazeface-short-{name}.json") for name in ("int8", "fp16", "onnx")
    ]
    quiet_ms = _quiet_ms(models, frames[0])
    fastest, slowest = quiet_ms.index(min(quiet_ms)), quiet_ms.index(max(quiet_ms))
    current, candidate = models[fastest], models[slowest]
    quiet = quiet_ms[slowest] / quiet_ms[fastest]
    assert quiet >= 1.3, f"the shipped models are too close to tell apart here: {quiet_ms}"
    stop = _busy_interpreter()
    try:
        pairs = _pair(current, candidate, frames).snapshot()
    finally:
        stop()
    above, below = (
        GateRules(max_latency_ratio=quiet / 1.5),
        GateRules(max_latency_ratio=quiet * 1.5),
    )
    result = evaluate(pairs, above)
    what = (quiet_ms, result.summary(above))
    assert result.latency_ratio is not None
    assert quiet / 1.3 <= result.latency_ratio <= quiet * 1.3, what
    assert result.latency_verdict == "fail", what
    assert evaluate(pairs, below).latency_verdict == "pass", (quiet_ms, result.summary(below))


def test_the_same_model_passes_latency_while_the_interpreter_is_busy(
    assets: Path, frames: list[np.ndarray]
) -> None:
    """A tolerance of 1.25x passes a model as fast as the current one."""
    rules = GateRules(max_latency_ratio=1.25)
    current = load_detector(assets / "blazeface-short-fp16.json")
    candidate = load_detector(assets / "blazeface-short-fp16.json")
    stop = _busy_interpreter()
    try:
        result = evaluate(_pair(current, candidate, frames).snapshot(), rules)
    finally:
        stop()
    assert result.latency_verdict == "pass", result.summary(rules)
    assert result.latency_interval is not None
    lo, hi = result.latency_interval
    assert 0.85 <= lo <= hi <= 1.15, result.latency_interval


def test_cpu_times_are_compared_only_where_both_are_known() -> None:
    both = Pair(0.0, 1, 1, 1, 10.0, 10.0, current_cpu_ms=1.0, candidate_cpu_ms=2.0)
    one = Pair(0.0, 1, 1, 1, 10.0, 30.0, current_cpu_ms=1.0)
    error = Pair(0.0, 1, 0, 0, 10.0, None, current_cpu_ms=1.0, candidate_cpu_ms=2.0)
    assert both.log_ratio == pytest.approx(math.log(2.0))
    assert one.log_ratio == pytest.approx(math.log(3.0))
    assert error.log_ratio is None


def test_the_cpu_time_is_measured_only_where_the_invoking_thread_computes(assets: Path) -> None:
    image = shipped_frames(1)[0]
    single = load_detector(assets / "blazeface-short-int8.json")
    result = single.detect(image)
    assert single.backend.computes_on_caller
    assert result.cpu_ms is not None and 0 < result.cpu_ms <= result.infer_ms * 1.05 + 0.05
    pooled = load_detector(assets / "blazeface-short-int8.json", threads=2)
    assert not pooled.backend.computes_on_caller
    assert pooled.detect(image).cpu_ms is None
