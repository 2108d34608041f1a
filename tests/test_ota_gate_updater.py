"""The health gate in the updater: shadow phase, paired probation, tolerances per rollout.

Real models on frames of the shipped video, a simulated 30 fps stream on a fake clock (the
rig of tests/ota_rig.py). Faults a real bundle cannot show on demand (boxes shifted
by half a box, a 10x slower model) are injected into the loaded candidate on purpose.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference.detector import Detector, InferenceResult, Prepared
from protocol import Detection, Gate
from tests.ota_rig import FRAMES, Rig, make_rig
from tests.ota_support import BASELINE_REF, desired

CANDIDATE = "blazeface-short-int8@2.0.0"
EMPTY = FRAMES[8]
"""The background without a face (a black frame "has" a face)."""


def shifted(detector: Detector) -> None:
    """Every box moved right by half its width (IoU 1/3 with the true one)."""
    infer = detector.infer

    def run(prepared: Prepared, *, min_score: float | None = None) -> InferenceResult:
        result = infer(prepared, min_score=min_score)
        moved = []
        for d in result.detections:
            x0, y0, x1, y1 = d.box
            half = (x1 - x0) / 2
            moved.append(
                Detection(label=d.label, score=d.score, box=(x0 + half, y0, x1 + half, y1))
            )
        return dataclasses.replace(result, detections=moved)

    detector.infer = run  # type: ignore[method-assign]


def ten_times_slower(detector: Detector) -> None:
    infer = detector.infer

    def run(prepared: Prepared, *, min_score: float | None = None) -> InferenceResult:
        result = infer(prepared, min_score=min_score)
        cpu_ms = result.cpu_ms * 10 if result.cpu_ms is not None else None
        return dataclasses.replace(result, infer_ms=result.infer_ms * 10, cpu_ms=cpu_ms)

    detector.infer = run  # type: ignore[method-assign]


def nan_outputs(detector: Detector) -> None:
    """A float model whose head turns NaN on live frames (after passing its self-test)."""
    output = detector.backend.output

    def nan(index: int) -> Any:
        array = np.array(output(index), dtype=np.float32)
        array[...] = np.nan
        return array

    detector.backend.output = nan  # type: ignore[method-assign]
    detector.backend.outputs = [
        dataclasses.replace(info, dtype=np.dtype(np.float32)) for info in detector.backend.outputs
    ]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (shifted, "shadow_agreement"),
        (ten_times_slower, "shadow_latency"),
        (nan_outputs, "shadow_errors"),
    ],
)
def test_bad_candidates_are_refused_in_the_shadow_within_30_s(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any, fault: Any, reason: str
) -> None:
    rig = make_rig(tmp_path, key)
    rig.sim.faults[CANDIDATE] = fault
    _, ref, _ = served(golden=[])  # no golden sample: only live frames can tell
    start = rig.sim.clock.t
    rig.apply(desired(1, {"front": ref}))
    front = rig.last.streams["front"]
    assert (front.phase, front.reason) == ("failed", reason)
    assert rig.sim.swaps == [] and rig.sim.active() == BASELINE_REF  # never went live
    assert rig.sim.clock.t - start < 30.0
    assert front.gate is not None and front.gate.verdict == "fail"


def test_a_scene_change_during_the_shadow_does_not_refuse_the_identical_model(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    """The room empties for 20 s: no evidence either way, then faces come back."""
    rig = make_rig(tmp_path, key)

    def scene(n: int) -> Any:
        since = rig.sim.shadow_from
        return EMPTY if since is None or n - since < 600 else FRAMES[n % len(FRAMES)]

    rig.sim.scene = scene
    _, ref, _ = served()
    rig.apply(desired(1, {"front": ref}))
    front = rig.last.streams["front"]
    assert (front.phase, front.reason) == ("committed", None), front
    gate = front.gate
    assert gate is not None and gate.agreement == 1.0
    assert gate.pairs > gate.informative_pairs + 90  # 20 s of nothing to compare


def _empty_camera(root: Path, key: Ed25519PrivateKey) -> Rig:
    """A rig whose camera sees the empty background only."""
    rig = make_rig(root, key)
    rig.sim.scene = lambda n: EMPTY
    return rig


def test_an_empty_camera_leaves_the_gate_undecided_and_the_default_refuses(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    rig = _empty_camera(tmp_path, key)
    _, ref, _ = served()
    rig.apply(desired(1, {"front": ref}), timeout=120)
    front = rig.last.streams["front"]
    assert (front.phase, front.reason) == ("failed", "shadow_inconclusive")
    assert front.gate is not None and front.gate.verdict == "undecided"
    assert "too few to judge agreement" in front.gate.summary
    message = rig.events[-1].message
    assert "not enough evidence" in message and "--undecided commit" in message


def test_a_rollout_can_commit_when_undecided_and_replace_without_comparing(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    rig = _empty_camera(tmp_path, key)
    _, ref, _ = served()
    rig.apply(
        desired(1, {"front": msgspec.structs.replace(ref, gate=Gate(undecided="commit"))}),
        timeout=120,
    )
    assert rig.last.streams["front"].phase == "committed"
    # "Replace, do not compare": a blind model with other labels would pass; no shadow phase.
    rig2 = make_rig(tmp_path / "two", key)
    rig2.sim.faults[CANDIDATE] = shifted
    _, ref2, _ = served(version="3.0.0", golden=[])
    rig2.sim.faults["blazeface-short-int8@3.0.0"] = shifted
    rig2.apply(desired(1, {"front": msgspec.structs.replace(ref2, gate=Gate(compare=False))}))
    assert rig2.last.streams["front"].phase == "committed"
    assert "ota.shadow" not in rig2.codes()


def test_a_per_rollout_tolerance_overrides_the_device_default(
    tmp_path: Path, key: Ed25519PrivateKey, served: Any
) -> None:
    rig = make_rig(tmp_path, key)
    rig.sim.faults[CANDIDATE] = ten_times_slower
    _, ref, _ = served()
    rig.apply(
        desired(1, {"front": msgspec.structs.replace(ref, gate=Gate(max_latency_ratio=20.0))})
    )
    front = rig.last.streams["front"]
    assert front.phase == "committed", front
    assert front.gate is not None and front.gate.latency_ratio is not None
    assert 5.0 < front.gate.latency_ratio < 20.0
