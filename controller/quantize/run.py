"""Quantize a float TFLite model with ai-edge-quantizer and compare it with the float one."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from common.atomic import atomic_write_bytes
from controller.bundles import run_local_inference
from controller.quantize.agreement import QuantizeReport, compare_detections
from controller.quantize.inputs import (
    DEFAULT_GOLDEN,
    DEFAULT_MAX_IMAGES,
    MANIFEST_FILE,
    MODEL_FILE,
    FixRange,
    QuantizeError,
    default_name,
    expected_shape,
    list_images,
    load_calibration,
    model_manifest,
    resolve_source,
)
from controller.tflite_graph import (
    add_uint8_input,
    graph_facts,
    tensor_suggestions,
    to_float32,
)
from protocol import encode_manifest

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
    source = resolve_source(src, manifest_template)
    spec = source.manifest.input
    if spec.std == 0:
        raise QuantizeError(f"{source.manifest_path}: input.std is 0; use the model's real std")
    float_bytes = source.model_path.read_bytes()
    fp32 = to_float32(float_bytes, what=str(source.model_path))
    io = fp32.io
    expected = expected_shape(spec)
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
    model_manifest(source.raw, model=float_bytes, **int8_fields)  # --name/--version valid?
    _import_quantizer()
    images = list_images(calibration, max_images)
    data = load_calibration(images, spec)
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
    manifest = model_manifest(source.raw, model=int8_bytes, **int8_fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_out, manifest_out = out_dir / MODEL_FILE, out_dir / MANIFEST_FILE
    atomic_write_bytes(model_out, int8_bytes)
    atomic_write_bytes(manifest_out, encode_manifest(manifest))

    with tempfile.TemporaryDirectory(prefix="efq-float-") as tmp:
        stage = Path(tmp)
        (stage / MODEL_FILE).write_bytes(float_bytes)
        float_manifest = model_manifest(source.raw, model=float_bytes)
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
