"""Non-maximum suppression and IoU on xyxy boxes (vectorized numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["SMALL_NMS", "batched_nms", "box_iou", "iou", "nms", "nms_list", "nms_numpy"]

SMALL_NMS = 48
"""Up to this many boxes, plain Python beats numpy's per-call overhead."""

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.intp]


def box_iou(box: FloatArray, boxes: FloatArray) -> FloatArray:
    """IoU of one box [4] with each of ``boxes`` [N, 4] (xmin, ymin, xmax, ymax)."""
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0.0, inter / np.where(union > 0.0, union, 1.0), 0.0)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw = (ax1 if ax1 < bx1 else bx1) - (ax0 if ax0 > bx0 else bx0)
    if iw <= 0.0:
        return 0.0
    ih = (ay1 if ay1 < by1 else by1) - (ay0 if ay0 > by0 else by0)
    if ih <= 0.0:
        return 0.0
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0.0 else 0.0


def nms_list(
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    iou_threshold: float,
    *,
    max_output: int | None = None,
) -> list[int]:
    """``nms`` on Python lists (same result), for the few boxes of a typical frame."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    keep: list[int] = []
    limit = len(order) if max_output is None else max_output
    for i in order:
        if len(keep) >= limit:
            break
        box = boxes[i]
        for j in keep:
            if iou(box, boxes[j]) >= iou_threshold:
                break
        else:
            keep.append(i)
    return keep


def nms(
    boxes: FloatArray,
    scores: FloatArray,
    iou_threshold: float,
    *,
    max_output: int | None = None,
) -> IntArray:
    """Plain (hard) NMS: indices of the kept boxes, best score first.

    A box is dropped when its IoU with an already kept, higher-scoring box is
    ``>= iou_threshold``. Equal scores keep the lower index first (stable sort).
    """
    if scores.shape[0] <= SMALL_NMS:
        small = nms_list(boxes.tolist(), scores.tolist(), iou_threshold, max_output=max_output)
        return np.asarray(small, dtype=np.intp)
    return nms_numpy(boxes, scores, iou_threshold, max_output=max_output)


def nms_numpy(
    boxes: FloatArray,
    scores: FloatArray,
    iou_threshold: float,
    *,
    max_output: int | None = None,
) -> IntArray:
    """``nms`` vectorized over the remaining boxes (for many boxes)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    limit = order.size if max_output is None else max_output
    while order.size and len(keep) < limit:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if not rest.size:
            break
        order = rest[box_iou(boxes[best], boxes[rest]) < iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def batched_nms(
    boxes: FloatArray,
    scores: FloatArray,
    classes: npt.NDArray[np.integer[Any]],
    iou_threshold: float,
    *,
    max_output: int | None = None,
) -> IntArray:
    """Class-wise NMS: boxes of different classes never suppress each other.

    Shifts each class's boxes by a distinct offset larger than any coordinate span, so
    one plain NMS pass does all classes.
    """
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    span = float(boxes.max() - min(float(boxes.min()), 0.0)) + 1.0
    shifted = boxes + (classes.astype(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_output=max_output)
