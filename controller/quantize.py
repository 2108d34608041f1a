"""``edgefleet model quantize``: a float TFLite model -> full-integer INT8 (docs/quantize.md).

Steps: the float model (fp32, or fp16 weights) is rewritten to fp32 with a signature and
its RELUs fused into the producing ops (:mod:`controller.tflite_graph`); ai-edge-quantizer
calibrates it on a folder of images, prepared as the agent prepares camera frames (the
manifest's input spec: resize, colour order, layout, ``(pixel - mean) / std``); the input
range and any ``--fix-range`` tensors are then set exactly; weights and activations are
quantized to int8 (static ranges); a uint8 input is put in front so the agent feeds raw
pixels. The output folder gets ``model.tflite`` and ``manifest.json``.

The report compares the two models on golden images through the inference core the agent
runs (:func:`inference.batch.detect_images`): detections are paired per image and agree when the label matches,
IoU >= 0.5 and the scores differ by <= 0.15 — the rule the agent's golden check applies
to a bundle, so an INT8 model that agrees everywhere passes golden samples taken from the
float one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from common.atomic import atomic_write_bytes
from controller.bundles import run_local_inference
from controller.errors import ControllerError
from controller.tflite_graph import (
    GraphFacts,
    add_uint8_input,
    graph_facts,
    tensor_suggestions,
    to_float32,
)
from inference.decoders.nms import iou
from protocol import Manifest, ProtocolError, decode_manifest, encode_manifest
from protocol.manifest import InputSpec

__all__ = [
    "CALIBRATION_EXTS",
    "DEFAULT_MAX_IMAGES",
    "FixRange",
    "GoldenComparison",
    "Pair",
    "QuantizeError",
    "QuantizeReport",
    "compare_detections",
    "parse_fix_range",
    "parse_range",
    "prepare_image",
    "quantize_model",
]

CALIBRATION_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_MAX_IMAGES = 200
"""Also in controller/cli_quantize.py (which must not import numpy at start-up)."""
DEFAULT_GOLDEN = 4
"""Golden images taken from the calibration set when none are given."""
MIN_IOU = 0.5
SCORE_TOLERANCE = 0.15
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
_FLOAT_SUFFIXES = ("-fp32", "-fp16", "-f32", "-f16", "-float32", "-float16", "-float")
_TFLITE_RUNTIMES = ("litert", "tflite")

Detection = tuple[str, float, tuple[float, float, float, float]]


class QuantizeError(ControllerError):
    """Quantizing cannot start (bad model, manifest, images or options) or its result is
    below the required golden-sample agreement."""


# --- options -------------------------------------------------------------------------------


def parse_range(text: str, *, what: str = "--input-range") -> tuple[float, float]:
    """``MIN:MAX`` -> (min, max) with finite min < max."""
    lo_s, sep, hi_s = text.strip().partition(":")
    try:
        if not sep:
            raise ValueError(text)
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise QuantizeError(f"{what} {text!r} is not MIN:MAX (two numbers, e.g. -1:1)") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise QuantizeError(f"{what} {text!r}: MIN must be below MAX and both finite")
    return lo, hi


@dataclass(frozen=True, slots=True)
class FixRange:
    tensor: str
    min: float
    max: float


def parse_fix_range(text: str) -> FixRange:
    """``TENSOR=MIN:MAX`` -> FixRange."""
    name, sep, rng = text.rpartition("=")
    if not sep or not name:
        raise QuantizeError(
            f"--fix-range {text!r} is not TENSOR=MIN:MAX (e.g. classificators=-16:16)"
        )
    lo, hi = parse_range(rng, what=f"--fix-range {name}")
    return FixRange(name, lo, hi)


# --- source model and manifest -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FloatSource:
    model_path: Path
    manifest_path: Path
    raw: dict[str, Any]
    manifest: Manifest


def _read_manifest(path: Path) -> tuple[dict[str, Any], Manifest]:
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, ValueError) as err:
        raise QuantizeError(f"cannot read manifest {path}: {err}") from err
    if not isinstance(raw, dict):
        raise QuantizeError(f"{path} is not a JSON object manifest")
    try:
        manifest = decode_manifest(text)
    except ProtocolError as err:
        raise QuantizeError(f"{path}: {err}") from err
    return raw, manifest


def _resolve_source(src: Path, manifest_template: Path | None) -> _FloatSource:
    if src.suffix == ".json":
        raw, manifest = _read_manifest(src)
        model_path = src.parent / manifest.model
        manifest_path = src
    else:
        candidates = (
            [manifest_template]
            if manifest_template is not None
            else [src.with_suffix(".json"), src.parent / MANIFEST_FILE]
        )
        found = [p for p in candidates if p.is_file()]
        if manifest_template is not None and not found:
            raise QuantizeError(f"manifest template {manifest_template} not found")
        chosen = next(
            (p for p in found if manifest_template is not None or _names_model(p, src)), None
        )
        if chosen is None:
            raise QuantizeError(
                f"{src} has no manifest next to it: pass --manifest-template JSON with its "
                "input, decoder and labels, or give the model's manifest .json instead"
            )
        manifest_path = chosen
        raw, manifest = _read_manifest(manifest_path)
        model_path = src
    if manifest.runtime not in _TFLITE_RUNTIMES or model_path.suffix != ".tflite":
        raise QuantizeError(
            f"{model_path} ({manifest.runtime}) is not a TFLite model: quantize takes a float "
            ".tflite model (runtime litert or tflite)"
        )
    if not model_path.is_file():
        raise QuantizeError(f"model file {model_path} not found (named in {manifest_path})")
    return _FloatSource(
        model_path=model_path, manifest_path=manifest_path, raw=raw, manifest=manifest
    )


def _names_model(manifest_path: Path, model: Path) -> bool:
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model") == model.name


def default_name(float_name: str) -> str:
    """``blazeface-short-fp16`` -> ``blazeface-short-int8``; otherwise NAME-int8."""
    for suffix in _FLOAT_SUFFIXES:
        if float_name.endswith(suffix):
            return float_name[: -len(suffix)] + "-int8"
    return f"{float_name[:59]}-int8"


def _model_manifest(raw: dict[str, Any], *, model: bytes, **updates: Any) -> Manifest:
    """``raw`` for a model file ``model.tflite`` with these bytes: files hashed, golden
    samples and latency budget dropped (they belong to the other model), ``updates`` set."""
    out = {k: v for k, v in raw.items() if k not in ("golden", "latency_budget_ms")}
    out.update(updates)
    out["model"] = MODEL_FILE
    out["files"] = [
        {"path": MODEL_FILE, "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
    ]
    try:
        return decode_manifest(json.dumps(out))
    except ProtocolError as err:
        raise QuantizeError(f"the INT8 model's manifest would be invalid: {err}") from err


# --- calibration images --------------------------------------------------------------------


def _list_images(folder: Path, max_images: int) -> list[Path]:
    if not folder.is_dir():
        raise QuantizeError(f"calibration folder {folder} not found: give a folder of images")
    found = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CALIBRATION_EXTS
    )
    if not found:
        exts = ", ".join(sorted(CALIBRATION_EXTS))
        raise QuantizeError(
            f"calibration folder {folder} has no images ({exts}): put representative "
            "frames from the cameras in it (100-200 is plenty)"
        )
    if len(found) > max_images:  # spread the pick over the whole (sorted) folder
        picks = np.linspace(0, len(found) - 1, max_images).round().astype(int)
        found = [found[i] for i in sorted(set(picks.tolist()))]
    return found


def prepare_image(bgr: npt.NDArray[Any], spec: InputSpec) -> npt.NDArray[np.float32]:
    """A BGR uint8 image as the float model's input [1, ...], prepared by the inference
    core exactly as the agent prepares camera frames (:mod:`inference.preprocess`)."""
    from inference.preprocess import float_preprocessor

    tensor = float_preprocessor(spec)(bgr).tensor
    return np.ascontiguousarray(tensor, dtype=np.float32)


def _load_calibration(paths: Sequence[Path], spec: InputSpec) -> list[npt.NDArray[np.float32]]:
    import cv2

    out = []
    for p in paths:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise QuantizeError(
                f"cannot read calibration image {p} (not an image, or corrupt): remove or "
                "replace it"
            )
        out.append(prepare_image(bgr, spec))
    return out


def _expected_shape(spec: InputSpec) -> tuple[int, ...]:
    if spec.layout == "nhwc":
        return (1, spec.height, spec.width, 3)
    return (1, 3, spec.height, spec.width)


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


# --- quantizing ----------------------------------------------------------------------------


def _import_quantizer() -> tuple[Any, Any]:
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as err:
        raise QuantizeError(
            f"quantizing needs ai-edge-quantizer, which is not installed ({err}): "
            "pip install 'edgefleet[quantize]'"
        ) from err
    return quantizer, recipe


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ai-edge-quantizer draws progress bars and warns about its own debug mode: keep the
    command's stdout (--json) clean and its stderr readable."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        devnull = stack.enter_context(open(os.devnull, "w", encoding="utf-8"))
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        stack.enter_context(contextlib.redirect_stderr(devnull))
        yield


def _quantize(
    fp32: bytes,
    *,
    signature_key: str,
    input_key: str,
    input_tensor: str,
    data: Sequence[npt.NDArray[np.float32]],
    input_range: tuple[float, float],
    fixed: Sequence[FixRange],
) -> bytes:
    quantizer, recipe = _import_quantizer()
    threads = max(1, min(8, os.cpu_count() or 1))
    try:
        with _quiet():
            qt = quantizer.Quantizer(bytearray(fp32))
            qt.load_quantization_recipe(recipe.static_wi8_ai8())
            calib = qt.calibrate(
                {signature_key: [{input_key: x} for x in data]}, num_threads=threads
            )
    except Exception as err:  # the library raises anything: say which step failed
        raise QuantizeError(
            f"ai-edge-quantizer could not calibrate the model: {err}; check that the manifest's "
            "input spec matches the model"
        ) from err
    overrides = [FixRange(input_tensor, *input_range), *fixed]
    for fix in overrides:
        if fix.tensor not in calib:
            close = ", ".join(tensor_suggestions(list(calib), fix.tensor))
            raise QuantizeError(
                f"tensor {fix.tensor!r} has no calibrated range (a constant?); --fix-range "
                f"takes activation tensors, e.g. {close}"
            )
        shape = np.asarray(calib[fix.tensor]["min"]).shape
        calib[fix.tensor] = {
            "min": np.full(shape, fix.min, np.float32),
            "max": np.full(shape, fix.max, np.float32),
        }
    try:
        with _quiet():
            result = qt.quantize(calib, enable_progress_report=False)
    except Exception as err:
        raise QuantizeError(
            f"ai-edge-quantizer could not quantize the model: {err}; an op it does not support "
            "in int8 stays the likely cause (see docs/quantize.md)"
        ) from err
    return bytes(result.quantized_model)


def _pick_golden(calibration: Sequence[Path]) -> list[Path]:
    if len(calibration) <= DEFAULT_GOLDEN:
        return list(calibration)
    picks = np.linspace(0, len(calibration) - 1, DEFAULT_GOLDEN).round().astype(int)
    return [calibration[i] for i in sorted(set(picks.tolist()))]


def quantize_model(
    src: Path,
    *,
    calibration: Path,
    out_dir: Path,
    name: str | None = None,
    version: str | None = None,
    golden: Sequence[Path] = (),
    input_range: tuple[float, float] | None = None,
    fix_ranges: Sequence[FixRange] = (),
    manifest_template: Path | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    min_agreement: float | None = None,
) -> QuantizeReport:
    """Quantize the float model ``src`` (a .tflite or its manifest .json) into ``out_dir``
    and compare it with the float one on ``golden`` (default: a few calibration images).

    Writes ``out_dir/model.tflite`` and ``out_dir/manifest.json``; raises QuantizeError
    for bad inputs before writing anything. The caller decides what a low agreement means
    (``report.ok`` against ``min_agreement``).
    """
    if max_images < 1:
        raise QuantizeError("--max-images must be at least 1")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise QuantizeError(f"--min-agreement {min_agreement} must be between 0 and 1")
    source = _resolve_source(src, manifest_template)
    spec = source.manifest.input
    if spec.std == 0:
        raise QuantizeError(f"{source.manifest_path}: input.std is 0; use the model's real std")
    float_bytes = source.model_path.read_bytes()
    fp32 = to_float32(float_bytes, what=str(source.model_path))
    io = fp32.io
    expected = _expected_shape(spec)
    if tuple(abs(d) for d in io.input_shape) not in {expected, (1, *expected[1:])}:
        raise QuantizeError(
            f"{source.model_path} has input shape {list(io.input_shape)} but its manifest "
            f"describes {list(expected)}: fix input.width/height/layout in "
            f"{source.manifest_path}"
        )
    for fix in fix_ranges:
        if fix.tensor not in io.activations:
            close = ", ".join(tensor_suggestions(io.activations, fix.tensor))
            raise QuantizeError(
                f"--fix-range: the model has no tensor {fix.tensor!r}; activation tensors "
                f"include {close}"
            )
    if input_range is None:
        input_range = ((0.0 - spec.mean) / spec.std, (255.0 - spec.mean) / spec.std)
        input_range = (min(input_range), max(input_range))
    float_desc = f" ({source.manifest.description})" if source.manifest.description else ""
    compat = dict(source.raw.get("compatibility") or {})
    compat["runtimes"] = ["litert"]
    int8_fields: dict[str, Any] = {
        "name": name or default_name(source.manifest.name),
        "version": version or source.manifest.version,
        "runtime": "litert",
        "compatibility": compat,
        "description": f"INT8 (uint8 input) of {source.manifest.ref} by `edgefleet model "
        f"quantize`{float_desc}",
    }
    _model_manifest(source.raw, model=float_bytes, **int8_fields)  # --name/--version valid?
    _import_quantizer()
    images = _list_images(calibration, max_images)
    data = _load_calibration(images, spec)
    golden_paths = list(golden) or _pick_golden(images)
    for g in golden_paths:
        if not g.is_file():
            raise QuantizeError(f"golden image {g} not found")

    q = _quantize(
        fp32.data,
        signature_key=io.signature_key,
        input_key=io.input_key,
        input_tensor=io.input_tensor,
        data=data,
        input_range=input_range,
        fixed=fix_ranges,
    )
    int8_bytes = add_uint8_input(q)
    manifest = _model_manifest(source.raw, model=int8_bytes, **int8_fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_out, manifest_out = out_dir / MODEL_FILE, out_dir / MANIFEST_FILE
    atomic_write_bytes(model_out, int8_bytes)
    atomic_write_bytes(manifest_out, encode_manifest(manifest))

    with tempfile.TemporaryDirectory(prefix="efq-float-") as tmp:
        stage = Path(tmp)
        (stage / MODEL_FILE).write_bytes(float_bytes)
        float_manifest = _model_manifest(source.raw, model=float_bytes)
        (stage / MANIFEST_FILE).write_bytes(encode_manifest(float_manifest))
        float_dets = run_local_inference(stage / MANIFEST_FILE, golden_paths)
    int8_dets = run_local_inference(manifest_out, golden_paths)
    comparisons = [
        compare_detections(str(img), f, q8)
        for img, f, q8 in zip(golden_paths, float_dets, int8_dets, strict=True)
    ]
    return QuantizeReport(
        float_model=str(source.model_path),
        model=str(model_out),
        manifest=str(manifest_out),
        ref=manifest.ref,
        float_ref=source.manifest.ref,
        calibration_images=len(images),
        input_range=input_range,
        fixed_ranges=list(fix_ranges),
        fp16_constants=fp32.fp16_constants,
        fused_activations=fp32.fused_activations,
        fp32_size=len(fp32.data),
        float_graph=graph_facts(float_bytes, what=str(source.model_path)),
        int8_graph=graph_facts(int8_bytes, what=str(model_out)),
        golden=comparisons,
        min_agreement=min_agreement,
    )
