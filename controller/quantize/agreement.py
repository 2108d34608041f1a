"""How far the INT8 model agrees with the float one on golden images, and the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.quantize.inputs import MIN_IOU, SCORE_TOLERANCE, Detection, FixRange
from controller.tflite_graph import (
    GraphFacts,
)
from inference.decoders.nms import iou

# --- agreement -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pair:
    """A float detection and the INT8 detection of the same label that overlaps it most."""

    label: str
    iou: float
    score_float: float
    score_int8: float
    agrees: bool
    """IoU >= 0.5 and |score delta| <= 0.15."""

    @property
    def score_delta(self) -> float:
        return self.score_int8 - self.score_float


@dataclass(frozen=True, slots=True)
class GoldenComparison:
    image: str
    float_detections: list[Detection]
    int8_detections: list[Detection]
    pairs: list[Pair]
    only_float: list[Detection]
    """Float detections with no overlapping INT8 detection of the same label (missed)."""
    only_int8: list[Detection]
    """INT8 detections with no float counterpart (extra)."""

    @property
    def units(self) -> int:
        """What this image counts for: its detections (the larger side), or 1 when empty."""
        return max(len(self.float_detections), len(self.int8_detections), 1)

    @property
    def agreed(self) -> int:
        if not self.float_detections and not self.int8_detections:
            return 1
        return sum(p.agrees for p in self.pairs)

    @property
    def agreement(self) -> float:
        return self.agreed / self.units


def compare_detections(
    image: str,
    float_dets: Sequence[Detection],
    int8_dets: Sequence[Detection],
    *,
    min_iou: float = MIN_IOU,
    score_tolerance: float = SCORE_TOLERANCE,
) -> GoldenComparison:
    """Pair detections greedily by IoU (same label, IoU > 0), each used once."""
    candidates = sorted(
        (
            (iou(f[2], q[2]), fi, qi)
            for fi, f in enumerate(float_dets)
            for qi, q in enumerate(int8_dets)
            if f[0] == q[0]
        ),
        reverse=True,
    )
    used_f: set[int] = set()
    used_q: set[int] = set()
    pairs = []
    for overlap, fi, qi in candidates:
        if overlap <= 0.0 or fi in used_f or qi in used_q:
            continue
        used_f.add(fi)
        used_q.add(qi)
        f, q = float_dets[fi], int8_dets[qi]
        agrees = overlap >= min_iou and abs(q[1] - f[1]) <= score_tolerance
        pairs.append(
            Pair(label=f[0], iou=overlap, score_float=f[1], score_int8=q[1], agrees=agrees)
        )
    return GoldenComparison(
        image=image,
        float_detections=list(float_dets),
        int8_detections=list(int8_dets),
        pairs=pairs,
        only_float=[d for i, d in enumerate(float_dets) if i not in used_f],
        only_int8=[d for i, d in enumerate(int8_dets) if i not in used_q],
    )


# --- report --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    float_model: str
    model: str
    """The INT8 model written (OUT/model.tflite)."""
    manifest: str
    ref: str
    float_ref: str
    calibration_images: int
    input_range: tuple[float, float]
    fixed_ranges: list[FixRange]
    fp16_constants: int
    fused_activations: int
    fp32_size: int
    """The float model rewritten to fp32 (what the quantizer starts from)."""
    float_graph: GraphFacts
    int8_graph: GraphFacts
    golden: list[GoldenComparison] = field(default_factory=list)
    min_agreement: float | None = None

    @property
    def size_ratio(self) -> float:
        return self.int8_graph.size / self.float_graph.size

    @property
    def size_ratio_fp32(self) -> float:
        return self.int8_graph.size / self.fp32_size

    @property
    def agreement_counts(self) -> tuple[int, int]:
        """(agreeing, all) detections over the golden images; an image where neither model
        finds anything counts as one agreeing unit."""
        return sum(g.agreed for g in self.golden), sum(g.units for g in self.golden)

    @property
    def agreement(self) -> float:
        agreed, units = self.agreement_counts
        return agreed / units if units else 1.0

    @property
    def ok(self) -> bool:
        return self.min_agreement is None or self.agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        def dets(items: Sequence[Detection]) -> list[dict[str, Any]]:
            return [{"label": d[0], "score": d[1], "box": list(d[2])} for d in items]

        return {
            "float_model": self.float_model,
            "model": self.model,
            "manifest": self.manifest,
            "ref": self.ref,
            "float_ref": self.float_ref,
            "calibration_images": self.calibration_images,
            "input_range": list(self.input_range),
            "fixed_ranges": [asdict(f) for f in self.fixed_ranges],
            "fp16_constants": self.fp16_constants,
            "fused_activations": self.fused_activations,
            "float_size": self.float_graph.size,
            "int8_size": self.int8_graph.size,
            "size_ratio": self.size_ratio,
            "fp32_size": self.fp32_size,
            "size_ratio_fp32": self.size_ratio_fp32,
            "float_graph": asdict(self.float_graph),
            "int8_graph": asdict(self.int8_graph),
            "golden": [
                {
                    "image": g.image,
                    "agreement": g.agreement,
                    "pairs": [{**asdict(p), "score_delta": p.score_delta} for p in g.pairs],
                    "only_float": dets(g.only_float),
                    "only_int8": dets(g.only_int8),
                    "float_detections": dets(g.float_detections),
                    "int8_detections": dets(g.int8_detections),
                }
                for g in self.golden
            ],
            "agreement": self.agreement,
            "min_agreement": self.min_agreement,
            "ok": self.ok,
        }
