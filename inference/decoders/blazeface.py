"""MediaPipe BlazeFace decoder: SSD anchors + box regressors + score logits, plain NMS.

Anchors follow MediaPipe's SsdAnchorsCalculator with the face-detection options
(aspect ratio 1.0 plus the interpolated scale, fixed anchor size): two anchors per cell
and layer, consecutive layers with the same stride share one grid. For the short-range
model (128x128, strides 8/16/16/16) that is 16x16x2 + 8x8x6 = 896 anchors.

Per frame the work is proportional to the rows that pass the score threshold: the
threshold is turned into a logit once (and into the quantized domain for int8 outputs),
so a frame without faces costs one vectorized comparison over the score column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.backends.base import TensorInfo, dequantize
from inference.decoders.base import Box, Outputs, RawDetection
from inference.decoders.nms import SMALL_NMS, nms, nms_list
from inference.errors import ModelError
from protocol.manifest import BlazeFaceDecoder

__all__ = ["BlazeFaceSsdDecoder", "ssd_anchors"]


def ssd_anchors(
    *,
    strides: Sequence[int],
    input_width: int,
    input_height: int,
    anchor_offset: float = 0.5,
) -> npt.NDArray[np.float64]:
    """Anchor centres [N, 2] (cx, cy), normalized, in the order of the model's rows."""
    centres: list[npt.NDArray[np.float64]] = []
    layer = 0
    while layer < len(strides):
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            last += 1
        per_cell = 2 * (last - layer)  # aspect ratio 1.0 + interpolated scale, per layer
        fm_w = math.ceil(input_width / strides[layer])
        fm_h = math.ceil(input_height / strides[layer])
        ys, xs = np.meshgrid(np.arange(fm_h), np.arange(fm_w), indexing="ij")
        grid = np.stack([(xs + anchor_offset) / fm_w, (ys + anchor_offset) / fm_h], axis=-1)
        centres.append(np.repeat(grid.reshape(-1, 2), per_cell, axis=0))
        layer = last
    return np.concatenate(centres).astype(np.float64)


def _output_index(infos: Sequence[TensorInfo], name: str, what: str) -> int:
    for i, info in enumerate(infos):
        if info.name == name:
            return i
    known = ", ".join(repr(i.name) for i in infos) or "none"
    raise ModelError(
        f"the model has no {what} output named {name!r} (outputs: {known}): "
        f"fix decoder.{what}_output in the model manifest"
    )


class BlazeFaceSsdDecoder:
    """Decodes ``regressors`` [1, N, 4+] and ``classificators`` [1, N, 1] (raw logits)."""

    def __init__(
        self,
        spec: BlazeFaceDecoder,
        labels: Sequence[str],
        outputs_info: Sequence[TensorInfo],
        *,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        if len(spec.strides) != spec.num_layers:
            raise ModelError(
                f"BlazeFace decoder: {len(spec.strides)} strides for {spec.num_layers} layers; "
                "give one stride per layer in the model manifest"
            )
        if len(labels) != 1:
            raise ModelError(
                f"BlazeFace detects one class but the manifest lists {len(labels)} labels: "
                "list exactly one (e.g. 'face')"
            )
        width, height = input_size or (int(spec.box_scale), int(spec.box_scale))
        anchors = ssd_anchors(
            strides=spec.strides,
            input_width=width,
            input_height=height,
            anchor_offset=spec.anchor_offset,
        )
        self._n = anchors.shape[0]
        self._reg_index = _output_index(outputs_info, spec.regressors_output, "regressors")
        self._score_index = _output_index(outputs_info, spec.scores_output, "scores")
        reg_info = outputs_info[self._reg_index]
        score_info = outputs_info[self._score_index]
        reg_size = math.prod(reg_info.shape)
        if reg_size % self._n or reg_size // self._n < 4 or math.prod(score_info.shape) != self._n:
            raise ModelError(
                f"BlazeFace decoder: {self._n} anchors (strides {spec.strides}, input "
                f"{width}x{height}) do not fit outputs {reg_info.name!r} {reg_info.shape} and "
                f"{score_info.name!r} {score_info.shape}: check the decoder and input settings "
                "in the model manifest"
            )
        self.output_indices = (self._reg_index, self._score_index)
        self._anchors = anchors
        self._box_scale = spec.box_scale
        self._inv_box_scale = 1.0 / spec.box_scale
        self._clip = spec.score_clip
        self._nms_iou = spec.nms_iou
        self._score_info = score_info
        self._reg_info = reg_info
        # One-byte quantized outputs: every possible value dequantized once, indexed by the
        # raw byte (a uint8 view), so per frame a fancy index replaces astype/sub/mul/exp.
        self._score_table = _byte_table(score_info, self._score_from_logits)
        self._reg_table = _byte_table(reg_info, lambda real: real / spec.box_scale)
        self._score_list = None if self._score_table is None else self._score_table.tolist()
        self._reg_list = None if self._reg_table is None else self._reg_table.tolist()
        self._anchor_list: list[tuple[float, float]] = [(a[0], a[1]) for a in anchors.tolist()]
        self._thresholds: dict[float, Any] = {}

    def _score_from_logits(self, logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        clipped = np.minimum(np.maximum(logits, -self._clip), self._clip)
        return 1.0 / (1.0 + np.exp(-clipped))

    def _prefilter(self, min_score: float) -> Any:
        """A threshold on the raw score column that keeps every row that can pass.

        It is at most one quantization step below the exact one; kept rows are checked
        exactly after dequantization. None: no prefilter (min_score outside (0, 1)).
        """
        cached = self._thresholds.get(min_score, self)
        if cached is not self:
            return cached
        threshold: Any = None
        if 0.0 < min_score < 1.0:
            logit = math.log(min_score) - math.log1p(-min_score)
            info = self._score_info
            if info.scale is None or info.zero_point is None:
                threshold = logit - 1e-6
            elif np.issubdtype(info.dtype, np.integer):
                limits = np.iinfo(info.dtype)
                q = math.floor(logit / info.scale + info.zero_point) - 1
                threshold = info.dtype.type(min(max(q, int(limits.min)), int(limits.max)))
        if len(self._thresholds) < 16:
            self._thresholds[min_score] = threshold
        return threshold

    def decode(self, outputs: Outputs, min_score: float) -> list[RawDetection]:
        score_output = outputs[self._score_index]
        threshold = self._prefilter(min_score)
        raw_scores = score_output.reshape(-1)
        if threshold is None:
            rows = np.arange(self._n)
        else:
            # One reduction decides a frame without candidates (the common case); numpy
            # calls are several times slower right after an invoke (cold caches).
            if score_output.max() < threshold:
                return []
            rows = (raw_scores >= threshold).nonzero()[0]
        raw_reg = outputs[self._reg_index].reshape(self._n, -1)[rows, :4]
        if rows.size <= SMALL_NMS:
            boxes, scores = self._boxes_few(rows, raw_scores[rows], raw_reg, min_score)
        else:
            boxes, scores = self._boxes_many(rows, raw_scores[rows], raw_reg, min_score)
        if len(scores) <= 1:
            keep = [0] if scores else []
        elif len(scores) <= SMALL_NMS:
            keep = nms_list(boxes, scores, self._nms_iou)
        else:
            keep = nms(np.asarray(boxes), np.asarray(scores), self._nms_iou).tolist()
        return [(0, scores[i], boxes[i]) for i in keep]

    def _boxes_few(
        self,
        rows: npt.NDArray[np.intp],
        picked: npt.NDArray[Any],
        raw_reg: npt.NDArray[Any],
        min_score: float,
    ) -> tuple[list[Box], list[float]]:
        """Per-row Python for the handful of rows of a typical frame: after an invoke the
        caches are cold and each numpy call costs several µs, so fewer calls win."""
        score_list = self._score_list
        if score_list is not None:
            row_scores = [score_list[b] for b in picked.view(np.uint8).tolist()]
        elif self._score_info.quantized:
            row_scores = self._score_from_logits(
                dequantize(picked, self._score_info).astype(np.float64)
            ).tolist()
        else:
            clip, exp = self._clip, math.exp
            row_scores = [
                1.0 / (1.0 + exp(-(clip if x > clip else -clip if x < -clip else x)))
                for x in picked.tolist()
            ]
        reg_list = self._reg_list
        if reg_list is not None:
            regs = raw_reg.view(np.uint8).tolist()
        else:
            regs = dequantize(raw_reg, self._reg_info).tolist()
        inv_scale = self._inv_box_scale
        anchors = self._anchor_list
        boxes: list[Box] = []
        scores: list[float] = []
        for row, score, reg in zip(rows.tolist(), row_scores, regs, strict=True):
            if score < min_score:
                continue
            if reg_list is not None:
                dx, dy = reg_list[reg[0]], reg_list[reg[1]]
                w, h = reg_list[reg[2]], reg_list[reg[3]]
            else:
                dx, dy = reg[0] * inv_scale, reg[1] * inv_scale
                w, h = reg[2] * inv_scale, reg[3] * inv_scale
            ax, ay = anchors[row]
            cx, cy, half_w, half_h = dx + ax, dy + ay, w * 0.5, h * 0.5
            boxes.append((cx - half_w, cy - half_h, cx + half_w, cy + half_h))
            scores.append(score)
        return boxes, scores

    def _boxes_many(
        self,
        rows: npt.NDArray[np.intp],
        picked: npt.NDArray[Any],
        raw_reg: npt.NDArray[Any],
        min_score: float,
    ) -> tuple[list[Box], list[float]]:
        """Vectorized variant for many rows (low thresholds, crowds)."""
        if self._score_table is not None:
            scores = self._score_table[picked.view(np.uint8)]
        else:
            scores = self._score_from_logits(
                dequantize(picked, self._score_info).astype(np.float64)
            )
        passed = scores >= min_score
        if not passed.all():
            rows, scores, raw_reg = rows[passed], scores[passed], raw_reg[passed]
        if self._reg_table is not None:
            reg = self._reg_table[raw_reg.view(np.uint8)]
        else:
            reg = dequantize(raw_reg, self._reg_info).astype(np.float64) / self._box_scale
        centre = reg[:, :2] + self._anchors[rows]
        half = reg[:, 2:] * 0.5
        boxes = np.concatenate((centre - half, centre + half), axis=1).tolist()
        return [(b[0], b[1], b[2], b[3]) for b in boxes], scores.tolist()


def _byte_table(
    info: TensorInfo, transform: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]
) -> npt.NDArray[np.float64] | None:
    """256 transformed real values indexed by the raw byte, for int8/uint8 quantized outputs."""
    scale, zero_point = info.scale, info.zero_point
    if scale is None or zero_point is None:
        return None
    if info.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return None
    raw = np.arange(256, dtype=np.uint8).view(info.dtype).astype(np.float64)
    table = transform((raw - zero_point) * scale)
    table.flags.writeable = False
    return table
