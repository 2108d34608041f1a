"""What quantizing starts from: the options, the float model and its manifest, and the
calibration images prepared as the agent prepares camera frames.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from controller.errors import ControllerError
from protocol import Manifest, ProtocolError, decode_manifest
from protocol.manifest import InputSpec

if TYPE_CHECKING:
    from inference.preprocess import Preprocessor

CALIBRATION_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_MAX_IMAGES = 200
"""Also in controller/cli/quantize.py (which must not import numpy at start-up)."""
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


def resolve_source(src: Path, manifest_template: Path | None) -> _FloatSource:
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


def model_manifest(raw: dict[str, Any], *, model: bytes, **updates: Any) -> Manifest:
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


def list_images(folder: Path, max_images: int) -> list[Path]:
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

    return _as_input(float_preprocessor(spec), bgr)


def _as_input(preprocess: Preprocessor, bgr: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(preprocess(bgr).tensor, dtype=np.float32)


def load_calibration(paths: Sequence[Path], spec: InputSpec) -> list[npt.NDArray[np.float32]]:
    import cv2

    from inference.preprocess import float_preprocessor

    preprocess = float_preprocessor(spec)  # one lookup table for all the images
    out = []
    for p in paths:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise QuantizeError(
                f"cannot read calibration image {p} (not an image, or corrupt): remove or "
                "replace it"
            )
        out.append(_as_input(preprocess, bgr))
    return out


def expected_shape(spec: InputSpec) -> tuple[int, ...]:
    if spec.layout == "nhwc":
        return (1, spec.height, spec.width, 3)
    return (1, 3, spec.height, spec.width)
