"""Decoder for raw YOLO heads (no NMS in the model): class-wise NMS in numpy.

Layouts (batch 1, the model's first output):

- ``v8`` (YOLOv8/v11, no objectness): [1, 4+C, N] (Ultralytics' export) or [1, N, 4+C];
  score = max class score.
- ``v5`` (YOLOv5/v7, objectness): [1, N, 5+C] (or [1, 5+C, N]);
  score = objectness × class score.

Boxes are (cx, cy, w, h) in input pixels, or 0..1 when the manifest says
``normalized: true``. C must equal the number of labels in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.backends.base import TensorInfo, dequantize
from inference.decoders.base import Outputs, RawDetection
from inference.decoders.nms import batched_nms
from inference.errors import ModelError
from protocol.manifest import YoloDecoder

__all__ = ["YoloRawDecoder"]

MAX_CANDIDATES = 3000
"""Highest-scoring boxes that go into NMS (bounds the work on noisy frames)."""
MAX_DETECTIONS = 300


class YoloRawDecoder:
    def __init__(
        self,
        spec: YoloDecoder,
        labels: Sequence[str],
        outputs_info: Sequence[TensorInfo],
        *,
        input_size: tuple[int, int] | None = None,
        output_index: int = 0,
    ) -> None:
        if not 0 <= output_index < len(outputs_info):
            raise ModelError(
                f"YOLO decoder: the model has {len(outputs_info)} outputs, "
                f"none at index {output_index}"
            )
        if not spec.normalized and input_size is None:
            raise ModelError(
                "YOLO decoder with pixel boxes (normalized: false) needs the model input size"
            )
        self._spec = spec
        self._info = outputs_info[output_index]
        self._num_classes = len(labels)
        self._channels = self._num_classes + (5 if spec.layout == "v5" else 4)
        self.output_indices = (output_index,)
        width, height = input_size or (1, 1)
        self._box_div = (
            np.ones(4) if spec.normalized else np.array([width, height, width, height], float)
        )
        shape = self._info.shape
        if len(shape) >= 2 and -1 not in shape[-2:] and self._channels not in shape[-2:]:
            raise ModelError(self._shape_error(shape))

    def _shape_error(self, shape: tuple[int, ...]) -> str:
        head = "[1, N, 5+C]" if self._spec.layout == "v5" else "[1, 4+C, N]"
        return (
            f"YOLO {self._spec.layout} decoder: output {self._info.name!r} has shape {shape}, "
            f"expected {head} with C = {self._num_classes} labels: fix the labels or "
            "decoder.layout in the model manifest"
        )

    def _channels_first(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Output as [channels, N] float32 (a view when already in that layout)."""
        arr = dequantize(raw, self._info)
        arr = arr.reshape(arr.shape[-2], arr.shape[-1]) if arr.ndim >= 2 else arr
        if arr.ndim != 2:
            raise ModelError(self._shape_error(tuple(raw.shape)))
        channels = self._channels
        if arr.shape[0] == channels and (self._spec.layout == "v8" or arr.shape[1] != channels):
            return arr
        if arr.shape[1] == channels:
            transposed: npt.NDArray[np.float32] = arr.T
            return transposed
        raise ModelError(self._shape_error(tuple(raw.shape)))

    def decode(self, outputs: Outputs, min_score: float) -> list[RawDetection]:
        data = self._channels_first(outputs[self.output_indices[0]])
        if self._spec.layout == "v5":
            objectness = data[4]
            cand = np.flatnonzero(objectness >= min_score)  # class score <= 1
            class_scores = data[5:, cand] * objectness[cand]
        else:
            best = data[4:].max(axis=0)
            cand = np.flatnonzero(best >= min_score)
            class_scores = data[4:, cand]
        if not cand.size:
            return []
        labels = class_scores.argmax(axis=0)
        scores = class_scores[labels, np.arange(cand.size)].astype(np.float64)
        passed = scores >= min_score
        cand, labels, scores = cand[passed], labels[passed], scores[passed]
        if not cand.size:
            return []
        if cand.size > MAX_CANDIDATES:
            top = np.argpartition(-scores, MAX_CANDIDATES)[:MAX_CANDIDATES]
            cand, labels, scores = cand[top], labels[top], scores[top]
        cxcywh = data[:4, cand].T.astype(np.float64) / self._box_div
        half = cxcywh[:, 2:] * 0.5
        boxes = np.concatenate([cxcywh[:, :2] - half, cxcywh[:, :2] + half], axis=1)
        keep = batched_nms(boxes, scores, labels, self._spec.nms_iou, max_output=MAX_DETECTIONS)
        result: list[RawDetection] = []
        for i in keep.tolist():
            x0, y0, x1, y1 = boxes[i].tolist()
            result.append((int(labels[i]), float(scores[i]), (x0, y0, x1, y1)))
        return result
