"""Decoder for models that end in TFLite_Detection_PostProcess (SSD MobileNet & co).

The model has already decoded its anchors and run NMS; its four outputs are
boxes [1, N, 4] (ymin, xmin, ymax, xmax, normalized), classes [1, N] (float class ids),
scores [1, N] and count [1] (valid rows). This decoder only thresholds, maps class ids
to label indices and reorders the box coordinates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from inference.backends.base import TensorInfo, dequantize
from inference.decoders.base import Outputs, RawDetection
from inference.errors import ModelError
from protocol.manifest import SsdPostprocessDecoder

__all__ = ["SsdPostprocessOutputDecoder"]

log = logging.getLogger(__name__)


class SsdPostprocessOutputDecoder:
    def __init__(
        self,
        spec: SsdPostprocessDecoder,
        labels: Sequence[str],
        outputs_info: Sequence[TensorInfo],
    ) -> None:
        indices = {
            "boxes_output": spec.boxes_output,
            "classes_output": spec.classes_output,
            "scores_output": spec.scores_output,
            "count_output": spec.count_output,
        }
        for field, index in indices.items():
            if not 0 <= index < len(outputs_info):
                raise ModelError(
                    f"SSD post-process decoder: decoder.{field} is {index} but the model has "
                    f"{len(outputs_info)} outputs ({', '.join(i.name for i in outputs_info)}): "
                    "fix the output indices in the model manifest"
                )
        boxes_info = outputs_info[spec.boxes_output]
        if boxes_info.shape and boxes_info.shape[-1] != 4:
            raise ModelError(
                f"SSD post-process decoder: output {spec.boxes_output} ({boxes_info.name!r}, "
                f"shape {boxes_info.shape}) is not a boxes tensor [1, N, 4]: fix "
                "decoder.boxes_output in the model manifest"
            )
        self.output_indices = (
            spec.boxes_output,
            spec.classes_output,
            spec.scores_output,
            spec.count_output,
        )
        self._infos = {i: outputs_info[i] for i in self.output_indices}
        self._spec = spec
        self._num_labels = len(labels)
        self._label_offset = spec.label_offset
        self._warned_labels = False

    def decode(self, outputs: Outputs, min_score: float) -> list[RawDetection]:
        spec = self._spec
        scores = dequantize(outputs[spec.scores_output], self._infos[spec.scores_output])
        scores = scores.reshape(-1)
        count = int(np.asarray(outputs[spec.count_output]).reshape(-1)[0])
        count = max(0, min(count, scores.shape[0]))
        rows = np.flatnonzero(scores[:count] >= min_score)
        if not rows.size:
            return []
        classes = dequantize(outputs[spec.classes_output], self._infos[spec.classes_output])
        label_idx = np.rint(classes.reshape(-1)[rows]).astype(np.int64) + self._label_offset
        valid = (label_idx >= 0) & (label_idx < self._num_labels)
        if not valid.all():
            if not self._warned_labels:
                log.warning(
                    "model returned class ids outside the %d manifest labels (%s); those "
                    "detections are dropped: check the labels and label_offset",
                    self._num_labels,
                    sorted(set(label_idx[~valid].tolist()))[:10],
                )
                self._warned_labels = True
            rows, label_idx = rows[valid], label_idx[valid]
        boxes = dequantize(outputs[spec.boxes_output], self._infos[spec.boxes_output])
        yx = boxes.reshape(-1, 4)[rows].astype(np.float64)
        kept = scores[rows].astype(np.float64)
        order = np.argsort(-kept, kind="stable")
        result: list[RawDetection] = []
        for i in order.tolist():
            ymin, xmin, ymax, xmax = yx[i].tolist()
            result.append((int(label_idx[i]), float(kept[i]), (xmin, ymin, xmax, ymax)))
        return result
