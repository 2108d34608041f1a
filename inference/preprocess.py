"""Camera frame (BGR uint8) -> the model's exact input tensor, plus the way back for boxes.

Built once per model from the manifest's ``InputSpec`` and the backend's input
``TensorInfo``. Per frame: resize (``stretch``, or ``letterbox`` keeping the aspect ratio)
with ``cv2.INTER_AREA`` (or the faster two-step ``area-fast``), BGR -> RGB if the model wants RGB, then the pixel mapping the
input tensor needs, done as one 256-entry lookup table (``cv2.LUT``):

- float inputs: ``(pixel - mean) / std`` as float32;
- quantized inputs (uint8/int8 with scale and zero point): that value quantized with the
  tensor's own scale/zero point, ``q = round(x / scale) + zero_point``.

When quantizing is (within one step) the identity, as for the shipped INT8 BlazeFace
(scale 2/255, zero point 127, mean = std = 127.5 gives q = p or p - 1), raw pixels are
fed as they are; when it is ``p - 128`` into an int8 tensor, a bit flip does it.

Thread-safe: every call allocates its own arrays; the preprocessor holds only read-only
tables. The camera thread can prepare frame n+1 while another thread runs frame n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from inference.backends.base import TensorInfo
from inference.errors import ModelError
from protocol.manifest import InputSpec

__all__ = ["LETTERBOX_PAD", "Prepared", "Preprocessor", "float_preprocessor", "quantize_pixels"]

LETTERBOX_PAD = 114
"""Gray pixel value of the letterbox borders (the Ultralytics convention)."""

Mode = Literal["raw", "flip", "lut", "take"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One frame ready for inference.

    Boxes normalized to the model input map to the frame (normalized) as
    ``x_frame = x_model * scale_x + offset_x`` (same for y). Identity for ``stretch``.
    """

    tensor: npt.NDArray[Any]
    frame_width: int
    frame_height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_frame(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A model-normalized xyxy box in frame-normalized coordinates (not clipped)."""
        sx, sy, ox, oy = self.scale_x, self.scale_y, self.offset_x, self.offset_y
        return (box[0] * sx + ox, box[1] * sy + oy, box[2] * sx + ox, box[3] * sy + oy)


def quantize_pixels(
    pixels: npt.NDArray[Any], *, mean: float, std: float, info: TensorInfo
) -> npt.NDArray[Any]:
    """The reference mapping: ``(pixels - mean) / std``, quantized when ``info`` is.

    Every preprocessing path must agree with this (within one quantization step).
    """
    x = (pixels.astype(np.float64) - mean) / std
    if info.scale is None or info.zero_point is None:
        return x.astype(info.dtype)
    q = np.round(x / info.scale) + info.zero_point
    if np.issubdtype(info.dtype, np.integer):
        limits = np.iinfo(info.dtype)
        q = np.clip(q, limits.min, limits.max)
    return q.astype(info.dtype)


def _expected_shape(spec: InputSpec) -> tuple[int, int, int]:
    if spec.layout == "nhwc":
        return (spec.height, spec.width, 3)
    return (3, spec.height, spec.width)


class Preprocessor:
    """Callable: ``prepared = preprocessor(frame_bgr)``."""

    def __init__(self, spec: InputSpec, info: TensorInfo) -> None:
        expected = _expected_shape(spec)
        shape = info.shape
        if len(shape) != 4 or shape[0] not in (1, -1) or shape[1:] != expected:
            raise ModelError(
                f"model input {info.name!r} has shape {list(shape)} but the manifest describes "
                f"{spec.layout} {spec.width}x{spec.height} RGB/BGR, i.e. [1, {', '.join(map(str, expected))}]: "
                "fix input.width/height/layout in the model manifest"
            )
        if spec.std == 0:
            raise ModelError("input.std is 0 in the model manifest: use a non-zero std")
        self.spec = spec
        self.info = info
        self._size = (spec.width, spec.height)
        self._rgb = spec.color == "rgb"
        self._nchw = spec.layout == "nchw"
        self._letterbox = spec.resize == "letterbox"
        self._fast = spec.interpolation == "area-fast"
        table = quantize_pixels(
            np.arange(256, dtype=np.uint8), mean=spec.mean, std=spec.std, info=info
        )
        table.flags.writeable = False
        self._table = table
        self.mode: Mode = self._choose_mode(table, info)
        self._lut = table.reshape(256, 1) if self.mode == "lut" else table

    @staticmethod
    def _choose_mode(table: npt.NDArray[Any], info: TensorInfo) -> Mode:
        if info.quantized and info.dtype in (np.dtype(np.uint8), np.dtype(np.int8)):
            diff = table.astype(np.int64) - np.arange(256)
            if info.dtype == np.uint8 and np.abs(diff).max() <= 1:
                return "raw"
            if info.dtype == np.int8 and np.abs(diff + 128).max() <= 1:
                return "flip"
        if info.dtype in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32)):
            return "lut"
        return "take"

    def __call__(self, frame_bgr: npt.NDArray[Any]) -> Prepared:
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
            frame_bgr = _as_bgr(frame_bgr)
        height, width = frame_bgr.shape[:2]
        image: Any  # uint8 HxWx3 (or 3xHxW); cv2 returns untyped arrays
        tensor: npt.NDArray[Any]
        if self._letterbox:
            image, sx, sy, ox, oy = self._letterboxed(frame_bgr, width, height)
        else:
            image = self._resize(frame_bgr, self._size)
            sx, sy, ox, oy = 1.0, 1.0, 0.0, 0.0
        if self._nchw:
            planar = image.transpose(2, 0, 1)
            image = np.ascontiguousarray(planar[::-1] if self._rgb else planar)
        elif self._rgb:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        mode = self.mode
        if mode == "lut":
            tensor = cv2.LUT(image.reshape(image.shape[0], -1), self._lut).reshape(image.shape)
        elif mode == "raw":
            tensor = image
        elif mode == "flip":
            tensor = (image ^ np.uint8(0x80)).view(np.int8)
        else:
            tensor = np.take(self._table, image)
        return Prepared(
            tensor=tensor[np.newaxis],
            frame_width=width,
            frame_height=height,
            scale_x=sx,
            scale_y=sy,
            offset_x=ox,
            offset_y=oy,
        )

    def _resize(self, frame: npt.NDArray[Any], size: tuple[int, int]) -> Any:
        w, h = size
        if self._fast and frame.shape[1] > 2 * w and frame.shape[0] > 2 * h:
            twice = cv2.resize(frame, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
            return cv2.resize(twice, size, interpolation=cv2.INTER_AREA)
        return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)

    def _letterboxed(
        self, frame: npt.NDArray[Any], width: int, height: int
    ) -> tuple[npt.NDArray[Any], float, float, float, float]:
        in_w, in_h = self._size
        scale = min(in_w / width, in_h / height)
        new_w = max(1, min(in_w, round(width * scale)))
        new_h = max(1, min(in_h, round(height * scale)))
        left = (in_w - new_w) // 2
        top = (in_h - new_h) // 2
        resized = self._resize(frame, (new_w, new_h))
        padded = cv2.copyMakeBorder(
            resized,
            top,
            in_h - new_h - top,
            left,
            in_w - new_w - left,
            cv2.BORDER_CONSTANT,
            value=(LETTERBOX_PAD, LETTERBOX_PAD, LETTERBOX_PAD),
        )
        # model x (normalized) * in_w = pixel in the padded image; minus left = pixel in
        # the resized image; divided by new_w = normalized frame x.
        return padded, in_w / new_w, in_h / new_h, -left / new_w, -top / new_h


def _as_bgr(frame: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Accept gray and BGRA uint8 frames too; anything else is a caller bug."""
    if frame.dtype == np.uint8 and frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    raise ModelError(
        f"expected a BGR uint8 frame (height x width x 3), got {frame.dtype} {frame.shape}"
    )


def float_preprocessor(spec: InputSpec) -> Preprocessor:
    """The preprocessor of a float32 input described by ``spec``: ``(pixel - mean) / std``.

    Quantization calibrates on exactly these tensors, so the INT8 model sees at run time
    what it was calibrated on.
    """
    shape = (1, *_expected_shape(spec))
    return Preprocessor(spec, TensorInfo(name="input", shape=shape, dtype=np.dtype(np.float32)))
