"""Golden-sample check of a freshly installed model before it goes live.

Each ``manifest.golden`` image is run through the loaded :class:`inference.detector.Detector`
and compared with what the model produced when it was packaged: every expected detection
must be matched (same label, IoU >= ``min_iou``, score within ``score_tolerance``) and any
other detection at or above the manifest's ``min_score`` is a failure. Outputs must be
finite, and the median of a few invokes must stay within ``latency_budget_ms``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.decoders.nms import iou
from inference.detector import Detector
from inference.errors import ModelError
from protocol import Detection, GoldenSample, Manifest

__all__ = ["GoldenFailure", "GoldenReport", "check_detections", "check_golden", "iou"]

log = logging.getLogger(__name__)

GOLDEN_MISMATCH = "golden_mismatch"
NAN_OUTPUT = "nan_output"
OVER_LATENCY_BUDGET = "over_latency_budget"
IMAGE_UNREADABLE = "golden_image_unreadable"
DETECTOR_ERROR = "detector_error"


@dataclass(frozen=True, slots=True)
class GoldenFailure:
    reason: str
    """Machine-readable code: golden_mismatch, nan_output, over_latency_budget, …"""
    detail: str
    image: str | None = None


@dataclass(frozen=True, slots=True)
class GoldenReport:
    failures: list[GoldenFailure] = field(default_factory=list)
    samples: int = 0
    latency_ms: float | None = None
    """Median invoke time over the latency runs (None when not measured)."""
    latency_budget_ms: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def reasons(self) -> list[str]:
        """Distinct failure codes, in first-seen order."""
        return list(dict.fromkeys(f.reason for f in self.failures))

    @property
    def reason(self) -> str | None:
        """The first failure code (for ``StreamReport.reason``), None when ok."""
        return self.failures[0].reason if self.failures else None


def check_detections(
    sample: GoldenSample, detections: Sequence[Detection], *, min_score: float
) -> list[GoldenFailure]:
    """Compare one image's detections with the sample's ``expected`` list (pure)."""
    failures: list[GoldenFailure] = []
    finite = []
    for det in detections:
        if all(math.isfinite(v) for v in (det.score, *det.box)):
            finite.append(det)
        else:
            failures.append(GoldenFailure(NAN_OUTPUT, f"non-finite detection {det}", sample.image))
    unused = list(finite)
    for label, score, box in sample.expected:
        candidates = [
            d
            for d in unused
            if d.label == label
            and abs(d.score - score) <= sample.score_tolerance
            and iou(d.box, box) >= sample.min_iou
        ]
        if not candidates:
            failures.append(
                GoldenFailure(
                    GOLDEN_MISMATCH,
                    f"expected {label} {score:.3f} at {box} not found (got "
                    f"{[(d.label, d.score, d.box) for d in finite]})",
                    sample.image,
                )
            )
            continue
        best = max(candidates, key=lambda d: iou(d.box, box))
        unused.remove(best)
    for det in unused:
        if det.score >= min_score:
            failures.append(
                GoldenFailure(
                    GOLDEN_MISMATCH,
                    f"unexpected {det.label} {det.score:.3f} at {det.box}",
                    sample.image,
                )
            )
    return failures


def check_golden(
    detector: Detector,
    bundle_dir: Path,
    manifest: Manifest,
    *,
    latency_runs: int = 10,
) -> GoldenReport:
    """Run the golden samples and the latency check; never raises for a bad model."""
    import cv2

    failures: list[GoldenFailure] = []
    frames: list[npt.NDArray[Any]] = []
    for sample in manifest.golden:
        image_path = Path(bundle_dir).joinpath(*sample.image.split("/"))
        frame = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if frame is None:
            failures.append(
                GoldenFailure(IMAGE_UNREADABLE, f"cannot read {image_path}", sample.image)
            )
            continue
        frames.append(frame)
        try:
            result = detector.infer(detector.preprocess(frame), min_score=manifest.min_score)
            failures += _check_raw_outputs(detector, sample.image)
        except ModelError as err:
            failures.append(GoldenFailure(DETECTOR_ERROR, str(err), sample.image))
            continue
        failures += check_detections(sample, result.detections, min_score=manifest.min_score)
    latency = None
    budget = manifest.latency_budget_ms
    if budget is not None and latency_runs > 0:
        frame = frames[0] if frames else _blank(manifest)
        try:
            prepared = detector.preprocess(frame)
            times = [detector.infer(prepared).infer_ms for _ in range(latency_runs)]
        except ModelError as err:
            failures.append(GoldenFailure(DETECTOR_ERROR, str(err)))
        else:
            latency = statistics.median(times)
            if latency > budget:
                failures.append(
                    GoldenFailure(
                        OVER_LATENCY_BUDGET,
                        f"median invoke {latency:.3f} ms over {latency_runs} runs exceeds "
                        f"the budget of {budget} ms",
                    )
                )
    report = GoldenReport(
        failures=failures,
        samples=len(manifest.golden),
        latency_ms=latency,
        latency_budget_ms=budget,
    )
    if report.ok:
        log.info("golden check of %s passed (%d samples)", manifest.ref, report.samples)
    else:
        log.warning("golden check of %s failed: %s", manifest.ref, report.failures)
    return report


def _check_raw_outputs(detector: Detector, image: str) -> list[GoldenFailure]:
    return [
        GoldenFailure(NAN_OUTPUT, f"output {name!r} has NaN/inf values", image)
        for name in detector.nonfinite_outputs()
    ]


def _blank(manifest: Manifest) -> npt.NDArray[Any]:
    return np.zeros((manifest.input.height, manifest.input.width, 3), dtype=np.uint8)
