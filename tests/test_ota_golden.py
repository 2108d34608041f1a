"""inference.golden on real bundles: the shipped int8 BlazeFace with the astronaut as golden."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ota.bundle import extract, open_bundle
from inference.detector import load_detector
from inference.golden import GoldenReport, check_detections, check_golden
from protocol import Detection, GoldenSample
from tests import images
from tests.bundle_factory import blazeface_files, blazeface_manifest, build_bundle

FACE = ("face", 0.905, (0.348, 0.159, 0.536, 0.346))


@pytest.fixture(scope="module")
def astronaut_png() -> bytes:
    image: npt.NDArray[Any] = images.astronaut()
    rgb = np.ascontiguousarray(image[..., :3])
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return png.tobytes()


def _golden_report(
    tmp_path: Path, png: bytes, *, latency_runs: int = 10, **changes: object
) -> GoldenReport:
    """check_golden on a signed bundle of the shipped model, installed as the agent does, whose
    manifest has ``changes``."""
    key = Ed25519PrivateKey.generate()
    files = {**blazeface_files(), "golden/astronaut.png": png}
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(**changes), files, key=key)
    verified = open_bundle(
        path, trusted_keys=[key.public_key()], agent_version="1.0", runtimes={"litert"}, arch="x"
    )
    folder = extract(verified, tmp_path / "installed")
    with load_detector(folder / "manifest.json") as detector:
        return check_golden(detector, folder, verified.manifest, latency_runs=latency_runs)


def _golden(expected: list[object], **kw: float) -> list[dict[str, object]]:
    return [{"image": "golden/astronaut.png", "expected": expected, **kw}]


def test_golden_astronaut_passes(tmp_path: Path, astronaut_png: bytes) -> None:
    report = _golden_report(
        tmp_path, astronaut_png, latency_runs=3, golden=_golden([FACE]), latency_budget_ms=10_000
    )
    assert report.ok, report.failures
    assert report.samples == 1
    assert report.latency_ms is not None and report.latency_ms > 0


def test_golden_that_expects_no_face_fails(tmp_path: Path, astronaut_png: bytes) -> None:
    report = _golden_report(tmp_path, astronaut_png, golden=_golden([]))
    assert not report.ok
    assert report.reason == "golden_mismatch"
    assert "unexpected face" in report.failures[0].detail


def test_golden_with_shifted_box_fails(tmp_path: Path, astronaut_png: bytes) -> None:
    shifted = ("face", 0.905, (0.6, 0.6, 0.8, 0.8))
    report = _golden_report(tmp_path, astronaut_png, golden=_golden([shifted]))
    assert report.reasons == ["golden_mismatch"]
    assert len(report.failures) == 2  # expected one missing, actual one unexpected


def test_tiny_latency_budget_is_over_latency_budget(tmp_path: Path, astronaut_png: bytes) -> None:
    report = _golden_report(
        tmp_path, astronaut_png, latency_runs=3, golden=_golden([FACE]), latency_budget_ms=0.001
    )
    assert report.reasons == ["over_latency_budget"]
    assert report.latency_ms is not None and report.latency_ms > 0.001


def test_nan_scores_are_nan_output() -> None:
    sample = GoldenSample(image="g.png", expected=[FACE])
    dets = [Detection(label="face", score=math.nan, box=FACE[2])]
    failures = check_detections(sample, dets, min_score=0.5)
    assert [f.reason for f in failures] == ["nan_output", "golden_mismatch"]


def test_score_outside_tolerance_is_a_mismatch() -> None:
    sample = GoldenSample(image="g.png", expected=[FACE], score_tolerance=0.05)
    low = [Detection(label="face", score=0.8, box=FACE[2])]
    assert [f.reason for f in check_detections(sample, low, min_score=0.9)] == ["golden_mismatch"]
    near = [Detection(label="face", score=0.88, box=(0.35, 0.16, 0.53, 0.34))]
    assert check_detections(sample, near, min_score=0.5) == []
