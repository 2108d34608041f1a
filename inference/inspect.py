"""Look inside a model file and draft its manifest (``edgefleet model init``).

:func:`inspect_model` loads a ``.tflite`` (LiteRT) or ``.onnx`` (ONNX Runtime) model with
the agent's own backends and lists its inputs and outputs (name, shape, dtype, quantization).
:func:`draft_manifest` recognises the decoder families the agent runs by the output shapes
(BlazeFace SSD anchors, TFLite_Detection_PostProcess, YOLO v8/v5) and drafts a manifest that
:func:`protocol.decode_manifest` accepts, with a TODO line for everything it had to guess.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.backends import TensorInfo, create_backend
from inference.decoders.blazeface import ssd_anchors
from inference.errors import ModelError

__all__ = ["Draft", "ModelSummary", "draft_manifest", "inspect_model"]

RUNTIMES = {".tflite": "litert", ".onnx": "onnx"}
"""Model suffix → the runtime that inspects it and that the draft names."""

BLAZEFACE_STRIDES: tuple[tuple[int, ...], ...] = ((8, 16, 16, 16),)
"""Anchor layouts tried for BlazeFace-style outputs (MediaPipe short range)."""

_SIDES = (1, 3)
"""Channel counts of image inputs (grey, colour)."""


@dataclass(frozen=True, slots=True)
class ModelSummary:
    path: Path
    runtime: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def lines(self) -> list[str]:
        """Human-readable: one line per tensor."""
        out = [f"{self.path} ({self.runtime})"]
        for kind, infos in (("input", self.inputs), ("output", self.outputs)):
            for i, info in enumerate(infos):
                quant = (
                    f", quantized scale {info.scale:.8g} zero_point {info.zero_point}"
                    if info.quantized
                    else ""
                )
                out.append(f"  {kind} {i} {info.name!r}: {list(info.shape)} {info.dtype}{quant}")
        return out


@dataclass(slots=True)
class Draft:
    manifest: dict[str, Any]
    family: str
    """The decoder family recognised (``blazeface``, ``ssd_postprocess``, ``yolo``)."""
    todo: list[str] = field(default_factory=list)
    """What could not be inferred: one line each, for the user to check."""


def inspect_model(path: Path) -> ModelSummary:
    """Load ``path`` with its runtime (LiteRT for .tflite, ONNX Runtime for .onnx)."""
    path = Path(path)
    runtime = RUNTIMES.get(path.suffix.lower())
    if runtime is None:
        raise ModelError(
            f"{path} is not a .tflite or .onnx model: `edgefleet model init` drafts "
            "manifests for those (TensorRT engines: write the manifest by hand)"
        )
    with create_backend(runtime, path) as backend:
        return ModelSummary(path, runtime, list(backend.inputs), list(backend.outputs))


def draft_manifest(
    summary: ModelSummary, *, name: str | None = None, version: str | None = None
) -> Draft:
    """A manifest draft for ``summary``; ModelError when no supported decoder family fits."""
    todo: list[str] = []
    input_spec = _input_spec(summary, todo)
    width, height = input_spec["width"], input_spec["height"]
    family, decoder, labels = _decoder(summary.outputs, (width, height), todo)
    model_file = summary.path.name
    data = summary.path.read_bytes()
    if name is None:
        name = re.sub(r"[^a-z0-9._-]+", "-", summary.path.stem.lower()).strip("-._")[:64]
        name = name or "model"
    if version is None:
        version = "0.1.0"
        todo.append("version: 0.1.0 is a placeholder; set the model's real version")
    todo.append(
        "min_score: 0.5 is a default threshold; tune it on your own images "
        "(`edgefleet-agent infer --min-score`)"
    )
    manifest: dict[str, Any] = {
        "schema": 1,
        "name": name,
        "version": version,
        "description": f"drafted by `edgefleet model init` from {model_file}",
        "runtime": summary.runtime,
        "model": model_file,
        "input": input_spec,
        "decoder": decoder,
        "labels": labels,
        "min_score": 0.5,
        "files": [
            {"path": model_file, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        ],
        "compatibility": {"runtimes": [summary.runtime]},
    }
    return Draft(manifest=manifest, family=family, todo=todo)


def _input_spec(summary: ModelSummary, todo: list[str]) -> dict[str, Any]:
    if len(summary.inputs) != 1:
        raise ModelError(
            f"{summary.path} has {len(summary.inputs)} inputs; edgefleet runs single-input "
            "image models"
        )
    info = summary.inputs[0]
    shape = info.shape
    if len(shape) != 4:
        raise ModelError(
            f"{summary.path}: input {info.name!r} has shape {list(shape)}; edgefleet runs "
            "image models with a 4-d input (1, H, W, C) or (1, C, H, W)"
        )
    if shape[3] in _SIDES:
        layout, height, width = "nhwc", shape[1], shape[2]
    elif shape[1] in _SIDES:
        layout, height, width = "nchw", shape[2], shape[3]
    else:
        raise ModelError(
            f"{summary.path}: input {info.name!r} has shape {list(shape)}: no 1- or "
            "3-channel axis, so it is not an image input edgefleet can feed"
        )
    if width < 1 or height < 1:
        raise ModelError(
            f"{summary.path}: input {info.name!r} has a dynamic size {list(shape)}; export "
            "the model with a fixed input size"
        )
    spec: dict[str, Any] = {
        "width": width,
        "height": height,
        "layout": layout,
        "color": "rgb",
        "resize": "stretch",
        "interpolation": "area-fast",
        "mean": 127.5,
        "std": 127.5,
    }
    todo.append('input.color: assumed RGB; set "bgr" if the model was trained on BGR')
    todo.append(
        'input.resize: assumed "stretch"; set "letterbox" if the model was trained on '
        "letterboxed images (most YOLO exports)"
    )
    if not info.quantized:
        todo.append(
            "input.mean/std: assumed (pixel - 127.5) / 127.5 (range -1..1); use mean 0, "
            "std 255 for a 0..1 model"
        )
    return spec


def _decoder(
    outputs: Sequence[TensorInfo], size: tuple[int, int], todo: list[str]
) -> tuple[str, dict[str, Any], list[str]]:
    for recognise in (_blazeface, _ssd_postprocess, _yolo):
        found = recognise(outputs, size, todo)
        if found is not None:
            return found
    shapes = ", ".join(f"{o.name!r} {list(o.shape)}" for o in outputs) or "none"
    raise ModelError(
        f"no supported decoder matches the model's outputs ({shapes}): edgefleet decodes "
        "BlazeFace SSD anchors ([1,N,16+] and [1,N,1]), TFLite_Detection_PostProcess "
        "([1,N,4], [1,N], [1,N], [1]) and YOLO ([1,4+C,N] or [1,N,5+C]); write the "
        "manifest by hand (see docs) or export the model with one of these heads"
    )


def _blazeface(
    outputs: Sequence[TensorInfo], size: tuple[int, int], todo: list[str]
) -> tuple[str, dict[str, Any], list[str]] | None:
    if len(outputs) != 2 or any(len(o.shape) != 3 for o in outputs):
        return None
    scores = [o for o in outputs if o.shape[2] == 1]
    boxes = [o for o in outputs if o.shape[2] >= 4 and o.shape[2] % 2 == 0]
    if len(scores) != 1 or len(boxes) != 1 or scores[0].shape[1] != boxes[0].shape[1]:
        return None
    rows = scores[0].shape[1]
    width, height = size
    for strides in BLAZEFACE_STRIDES:
        anchors = ssd_anchors(strides=strides, input_width=width, input_height=height)
        if len(anchors) == rows:
            decoder = {
                "type": "blazeface",
                "num_layers": len(strides),
                "strides": list(strides),
                "anchor_offset": 0.5,
                "box_scale": float(width),
                "score_clip": 100.0,
                "nms_iou": 0.3,
                "regressors_output": boxes[0].name,
                "scores_output": scores[0].name,
            }
            todo.append(
                f"decoder: BlazeFace SSD anchors recognised ({rows} anchors, strides "
                f"{list(strides)}); nms_iou 0.3 is MediaPipe's default"
            )
            todo.append('labels: ["face"] assumed (a BlazeFace face detector)')
            return "blazeface", decoder, ["face"]
    return None


def _ssd_postprocess(
    outputs: Sequence[TensorInfo], _size: tuple[int, int], todo: list[str]
) -> tuple[str, dict[str, Any], list[str]] | None:
    if len(outputs) != 4:
        return None
    shapes = [o.shape for o in outputs]
    box = [i for i, s in enumerate(shapes) if len(s) == 3 and s[2] == 4]
    per_row = [i for i, s in enumerate(shapes) if len(s) == 2]
    count = [i for i, s in enumerate(shapes) if len(s) == 1]
    if len(box) != 1 or len(per_row) != 2 or len(count) != 1:
        return None
    classes, scores = per_row
    decoder = {
        "type": "ssd_postprocess",
        "boxes_output": box[0],
        "classes_output": classes,
        "scores_output": scores,
        "count_output": count[0],
        "label_offset": 0,
    }
    todo.append(
        f"decoder: TFLite_Detection_PostProcess recognised; classes_output {classes} and "
        f"scores_output {scores} are told apart by order only: swap them if detections look wrong"
    )
    todo.append("labels: unknown; list the class names in the model's class order")
    todo.append("decoder.label_offset: 0 assumed (1 if class 0 is a background class)")
    return "ssd_postprocess", decoder, ["class0"]


def _yolo(
    outputs: Sequence[TensorInfo], _size: tuple[int, int], todo: list[str]
) -> tuple[str, dict[str, Any], list[str]] | None:
    if len(outputs) != 1 or len(outputs[0].shape) != 3 or -1 in outputs[0].shape[1:]:
        return None
    a, b = outputs[0].shape[1], outputs[0].shape[2]
    if 4 < a < b:
        layout, classes = "v8", a - 4
    elif 5 < b < a:
        layout, classes = "v5", b - 5
        todo.append(
            f"decoder.layout: [1,{a},{b}] read as YOLOv5 (5+{classes} channels: box, "
            f"objectness, classes); a transposed v8 head ({b - 4} classes) looks the same"
        )
    else:
        return None
    decoder = {
        "type": "yolo",
        "layout": layout,
        "nms_iou": 0.45,
        "box_format": "cxcywh",
        "normalized": False,
    }
    todo.append(
        f"decoder: YOLO {layout} recognised ({classes} classes); normalized false assumes "
        "boxes in input pixels (true if they are 0..1)"
    )
    coco = " (80: probably the COCO classes)" if classes == 80 else ""
    todo.append(f"labels: unknown; replace class0..class{classes - 1} with the names{coco}")
    return "yolo", decoder, [f"class{i}" for i in range(classes)]
