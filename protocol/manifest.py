"""Model manifest: what a model bundle contains and how to run and check it.

A manifest (``manifest.json`` next to the model files) tells the agent which runtime
loads the model, how to feed it and which decoder turns its outputs into boxes. The OTA
bundle format adds golden samples, a latency budget, compatibility and a signature.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

import msgspec

from protocol.errors import ProtocolError
from protocol.limits import MODEL_VERSION_PATTERN

MANIFEST_SCHEMA: Literal[1] = 1

Runtime = Literal["litert", "tflite", "onnx", "tensorrt"]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelFile(_Strict, frozen=True, kw_only=True):
    path: str
    """Relative to the manifest; no ``..`` and not absolute."""
    sha256: str
    size: int


class InputSpec(_Strict, frozen=True, kw_only=True):
    width: int
    height: int
    layout: Literal["nhwc", "nchw"] = "nhwc"
    color: Literal["rgb", "bgr"] = "rgb"
    resize: Literal["stretch", "letterbox"] = "stretch"
    interpolation: Literal["area", "area-fast"] = "area"
    """``area``: cv2.INTER_AREA (reference quality). ``area-fast``: bilinear to twice the
    target size, then an exact 2x area reduction — within ~1 grey level of ``area`` and
    4-8x faster for camera-sized frames."""
    mean: float = 127.5
    """Float models get ``(pixel - mean) / std``; quantized models get raw pixels
    quantized with the input tensor's own scale and zero point."""
    std: float = 127.5


class BlazeFaceDecoder(_Strict, frozen=True, kw_only=True, tag="blazeface"):
    """MediaPipe SSD-anchor decoder (BlazeFace short/full range)."""

    num_layers: int = 4
    strides: list[int] = msgspec.field(default_factory=lambda: [8, 16, 16, 16])
    anchor_offset: float = 0.5
    box_scale: float = 128.0
    score_clip: float = 100.0
    nms_iou: float = 0.3
    regressors_output: str = "regressors"
    scores_output: str = "classificators"


class SsdPostprocessDecoder(_Strict, frozen=True, kw_only=True, tag="ssd_postprocess"):
    """Outputs of TFLite_Detection_PostProcess: boxes [1,N,4] (ymin,xmin,ymax,xmax),
    classes [1,N], scores [1,N], count [1]."""

    boxes_output: int = 0
    classes_output: int = 1
    scores_output: int = 2
    count_output: int = 3
    label_offset: int = 0


class YoloDecoder(_Strict, frozen=True, kw_only=True, tag="yolo"):
    """Raw YOLO outputs: [1, 4+C, N] (v8 style, no objectness) or [1, N, 5+C] (v5 style)."""

    layout: Literal["v8", "v5"] = "v8"
    nms_iou: float = 0.45
    box_format: Literal["cxcywh"] = "cxcywh"
    normalized: bool = False
    """True when the boxes are already 0..1, else in input pixels."""


DecoderSpec = BlazeFaceDecoder | SsdPostprocessDecoder | YoloDecoder


class GoldenSample(_Strict, frozen=True, kw_only=True):
    image: str
    """Relative path of an input image in the bundle."""
    expected: list[tuple[str, float, tuple[float, float, float, float]]]
    """(label, score, box xyxy normalized) the model produced when packaged."""
    min_iou: float = 0.5
    score_tolerance: float = 0.15


class Compatibility(_Strict, frozen=True, kw_only=True):
    min_agent_version: str | None = None
    runtimes: list[Runtime] = msgspec.field(default_factory=list)
    architectures: list[str] = msgspec.field(default_factory=list)


LINEAGE_MAX_ENTRIES = 32
"""At most this many ``lineage.metrics`` and this many ``lineage.labels``."""
_TEXT = r"^[^\x00-\x1f\x7f]*$"  # one line, no control characters
_KEY = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$"
LineageKey = Annotated[str, msgspec.Meta(pattern=_KEY)]


class Lineage(_Strict, frozen=True, kw_only=True):
    """Where a model came from (``edgefleet model publish``); signed with the manifest."""

    source_commit: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_TEXT)] | None
    ) = None
    """The commit the model was built from (any VCS id, max 128 characters)."""
    training_data: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=_TEXT)] | None
    ) = None
    """The training data set: a URI, a name or a version (max 512 characters)."""
    metrics: Annotated[dict[LineageKey, float], msgspec.Meta(max_length=LINEAGE_MAX_ENTRIES)] = (
        msgspec.field(default_factory=dict)
    )
    """Evaluation results, name (max 64 characters) to a finite number, e.g. ``{"map50": 0.71}``."""
    labels: Annotated[
        dict[LineageKey, Annotated[str, msgspec.Meta(max_length=256, pattern=_TEXT)]],
        msgspec.Meta(max_length=LINEAGE_MAX_ENTRIES),
    ] = msgspec.field(default_factory=dict)
    """Free-form key (max 64 characters) to value (max 256), e.g. ``{"pipeline": "URL"}``."""


class Manifest(_Strict, frozen=True, kw_only=True):
    schema: Literal[1]
    name: str
    version: str
    runtime: Runtime
    model: str
    """Relative path of the model file (one of ``files``)."""
    input: InputSpec
    decoder: DecoderSpec = msgspec.field(name="decoder")
    labels: list[str]
    min_score: float = 0.5
    files: list[ModelFile] = msgspec.field(default_factory=list)
    golden: list[GoldenSample] = msgspec.field(default_factory=list)
    latency_budget_ms: float | None = None
    compatibility: Compatibility = msgspec.field(default_factory=Compatibility)
    description: str = ""
    lineage: Lineage | msgspec.UnsetType = msgspec.UNSET
    """Optional provenance; absent from the encoding (and so from the signed bytes) when unset."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def decode_manifest(data: bytes | str) -> Manifest:
    """Strictly decode and check a manifest; raise ProtocolError naming the problem."""
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise ProtocolError(f"invalid model manifest: {err}") from err
    if not _NAME.fullmatch(manifest.name):
        raise ProtocolError(
            f"invalid model name {manifest.name!r}: use a-z, 0-9, '.', '_' or '-' (max 64)"
        )
    if not re.search(MODEL_VERSION_PATTERN, manifest.version):
        raise ProtocolError(
            f"invalid model version {manifest.version!r}: use 1-64 characters without spaces, "
            "'@', '/' or '\\' (e.g. 1.2.0)"
        )
    for rel in [
        manifest.model,
        *(f.path for f in manifest.files),
        *(g.image for g in manifest.golden),
    ]:
        check_relative_path(rel)
    if isinstance(manifest.lineage, Lineage):
        for metric, value in manifest.lineage.metrics.items():
            if not math.isfinite(value):
                raise ProtocolError(f"lineage metric {metric!r} is {value}: use a finite number")
    if manifest.files and manifest.model not in {f.path for f in manifest.files}:
        raise ProtocolError(f"manifest model {manifest.model!r} is not listed in files")
    return manifest


def check_relative_path(rel: str) -> str:
    """Reject absolute paths and ``..`` so a bundle cannot write outside its folder."""
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ProtocolError(
            f"unsafe path {rel!r} in manifest: use a relative path inside the bundle"
        )
    return rel


def encode_manifest(manifest: Manifest) -> bytes:
    """Canonical JSON (sorted keys) — the bytes a signature covers."""
    return msgspec.json.format(msgspec.json.encode(manifest, order="sorted"), indent=2)
