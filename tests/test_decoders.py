"""Decoders: BlazeFace on the real models, SSD post-process and YOLO on built tensors, NMS."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from inference.backends import Backend, TensorInfo, create_backend, dequantize
from inference.decoders import RawDetection, make_decoder
from inference.decoders.blazeface import ssd_anchors
from inference.decoders.nms import batched_nms, iou, nms, nms_list, nms_numpy
from inference.errors import ModelError
from protocol import BlazeFaceDecoder, SsdPostprocessDecoder, YoloDecoder
from tests import images

ASSETS = Path(__file__).resolve().parent.parent / "inference" / "assets"
F32 = np.dtype(np.float32)


def _image(name: str) -> npt.NDArray[Any]:
    return images.image(name)


def info(name: str, shape: tuple[int, ...], dtype: Any = F32, **quant: Any) -> TensorInfo:
    return TensorInfo(name=name, shape=shape, dtype=np.dtype(dtype), **quant)


# --- NMS ------------------------------------------------------------------------------


def test_nms_suppresses_overlaps_and_keeps_best_first() -> None:
    boxes = np.array(
        [
            [0.0, 0.0, 1.0, 1.0],
            [0.05, 0.0, 1.05, 1.0],  # IoU ~0.9 with box 0
            [2.0, 2.0, 3.0, 3.0],
            [0.5, 0.0, 1.5, 1.0],  # IoU 1/3 with box 0
        ]
    )
    scores = np.array([0.8, 0.9, 0.7, 0.6])
    assert nms(boxes, scores, 0.3).tolist() == [1, 2]
    assert nms(boxes, scores, 0.5).tolist() == [1, 2, 3]
    assert nms(boxes, scores, 0.5, max_output=2).tolist() == [1, 2]


def test_python_and_vectorized_nms_agree_on_many_random_boxes() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(2, 200))
        xy = rng.random((n, 2))
        wh = rng.random((n, 2)) * 0.3
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.random(n).round(2)  # ties included
        expected = nms_list(boxes.tolist(), scores.tolist(), 0.4)
        assert nms_numpy(boxes, scores, 0.4).tolist() == expected
        assert nms(boxes, scores, 0.4).tolist() == expected


def test_batched_nms_only_suppresses_within_a_class() -> None:
    boxes = np.array([[10.0, 10, 50, 50], [12, 10, 52, 50], [11, 10, 51, 50]])
    scores = np.array([0.9, 0.8, 0.7])
    classes = np.array([0, 0, 1])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes[:0], scores[:0], classes[:0], 0.5).tolist() == []


def test_iou_of_disjoint_touching_and_identical_boxes() -> None:
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)


# --- BlazeFace --------------------------------------------------------------------------


def test_short_range_anchors_match_the_mediapipe_layout() -> None:
    anchors = ssd_anchors(strides=[8, 16, 16, 16], input_width=128, input_height=128)
    assert anchors.shape == (896, 2)
    # 16x16 grid, 2 per cell, then 8x8 grid, 6 per cell
    assert anchors[0].tolist() == anchors[1].tolist() == [0.5 / 16, 0.5 / 16]
    assert anchors[2].tolist() == [1.5 / 16, 0.5 / 16]
    assert anchors[511].tolist() == [15.5 / 16, 15.5 / 16]
    assert anchors[512:518].tolist() == [[0.5 / 8, 0.5 / 8]] * 6
    assert anchors[518].tolist() == [1.5 / 8, 0.5 / 8]
    assert anchors[-1].tolist() == [7.5 / 8, 7.5 / 8]


def _reference_decode(
    regressors: npt.NDArray[Any], logits: npt.NDArray[Any], min_score: float
) -> list[tuple[float, list[float]]]:
    """shared/assets/verify_assets.py's decode: float64 everywhere, plain NMS."""
    anchors = ssd_anchors(strides=[8, 16, 16, 16], input_width=128, input_height=128)
    r = np.asarray(regressors, np.float64).reshape(896, 16)
    cx = r[:, 0] / 128 + anchors[:, 0]
    cy = r[:, 1] / 128 + anchors[:, 1]
    w, h = r[:, 2] / 128, r[:, 3] / 128
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    scores = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, np.float64).reshape(896), -100, 100)))
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < min_score:
            break
        if all(iou(boxes[i].tolist(), boxes[j].tolist()) < 0.3 for j in keep):
            keep.append(int(i))
    return [(float(scores[i]), boxes[i].tolist()) for i in keep]


def _run(backend: Backend, image_rgb: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
    small = cv2.resize(image_rgb, (128, 128), interpolation=cv2.INTER_AREA)
    inp = backend.inputs[0]
    tensor: npt.NDArray[Any]
    if inp.dtype == np.uint8:
        tensor = small
    else:
        tensor = (small.astype(np.float32) - 127.5) / 127.5
        if inp.shape[1] == 3:
            tensor = tensor.transpose(2, 0, 1)
    backend.set_input(np.ascontiguousarray(tensor)[None])
    backend.invoke()
    return [backend.output(i) for i in range(len(backend.outputs))]


@pytest.fixture(scope="module", params=["int8", "fp16", "onnx"])
def model_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    files = {
        "int8": ("litert", "blazeface-short-int8.tflite"),
        "fp16": ("litert", "blazeface-short-fp16.tflite"),
        "onnx": ("onnx", "blazeface-short.onnx"),
    }
    name, file = files[request.param]
    with create_backend(name, ASSETS / file) as backend:
        yield backend


@pytest.mark.parametrize("min_score", [0.5, 0.3, 0.75, 0.9])
@pytest.mark.parametrize("image", ["astronaut", "coffee", "chelsea"])
def test_blazeface_decoder_matches_the_reference_decode_on_real_outputs(
    model_backend: Backend, image: str, min_score: float
) -> None:
    outputs = _run(model_backend, _image(image))
    decoder = make_decoder(BlazeFaceDecoder(), ["face"], model_backend.outputs)
    got = decoder.decode(outputs, min_score)
    real = [dequantize(o, i) for o, i in zip(outputs, model_backend.outputs, strict=True)]
    expected = _reference_decode(real[0], real[1], min_score)
    assert len(got) == len(expected)
    for (label, score, box), (ref_score, ref_box) in zip(got, expected, strict=True):
        assert label == 0
        assert score == pytest.approx(ref_score, abs=1e-6)
        assert box == pytest.approx(ref_box, abs=1e-5)
    if image == "astronaut" and min_score <= 0.9:
        assert len(got) == 1
        assert got[0][1] >= 0.9
    if image != "astronaut" and min_score >= 0.5:
        assert got == []


def test_blazeface_quantized_threshold_equals_the_float_path_for_any_min_score() -> None:
    with create_backend("litert", ASSETS / "blazeface-short-int8.tflite") as backend:
        outputs = _run(backend, _image("astronaut"))
        quantized = make_decoder(BlazeFaceDecoder(), ["face"], backend.outputs)
        float_infos = [TensorInfo(name=i.name, shape=i.shape, dtype=F32) for i in backend.outputs]
        floating = make_decoder(BlazeFaceDecoder(), ["face"], float_infos)
        real = [dequantize(o, i) for o, i in zip(outputs, backend.outputs, strict=True)]
        for min_score in [0.0, 1e-9, 0.05, 0.2, 0.5, 0.5311, 0.7, 0.9, 0.9054, 0.99, 1.0]:
            q = quantized.decode(outputs, min_score)
            f = floating.decode(real, min_score)
            assert [d[0] for d in q] == [d[0] for d in f]
            assert [d[1] for d in q] == pytest.approx([d[1] for d in f], abs=1e-6)
            assert all(d[1] >= min_score for d in q)


def test_blazeface_decoder_names_missing_outputs() -> None:
    outputs = [info("regressors", (1, 896, 16)), info("scores", (1, 896, 1))]
    with pytest.raises(ModelError, match=r"no scores output named 'classificators'.*'scores'"):
        make_decoder(BlazeFaceDecoder(), ["face"], outputs)


def test_blazeface_decoder_rejects_outputs_that_do_not_fit_the_anchors() -> None:
    outputs = [info("regressors", (1, 1152, 16)), info("classificators", (1, 1152, 1))]
    with pytest.raises(ModelError, match=r"896 anchors .* do not fit"):
        make_decoder(BlazeFaceDecoder(), ["face"], outputs)
    one_layer = BlazeFaceDecoder(strides=[8], num_layers=1, box_scale=192.0)  # 24*24*2 anchors
    decoder = make_decoder(one_layer, ["face"], outputs, input_size=(192, 192))
    assert decoder.output_indices == (0, 1)


def test_blazeface_decoder_needs_exactly_one_label() -> None:
    outputs = [info("regressors", (1, 896, 16)), info("classificators", (1, 896, 1))]
    with pytest.raises(ModelError, match="exactly one"):
        make_decoder(BlazeFaceDecoder(), ["face", "cat"], outputs)
    with pytest.raises(ModelError, match="no labels"):
        make_decoder(BlazeFaceDecoder(), [], outputs)


# --- SSD post-process ------------------------------------------------------------------

SSD_INFOS = [
    info("boxes", (1, 10, 4)),
    info("classes", (1, 10)),
    info("scores", (1, 10)),
    info("count", (1,)),
]


def _ssd_outputs(
    rows: list[tuple[float, float, tuple[float, float, float, float]]], count: int
) -> list[npt.NDArray[Any]]:
    boxes = np.zeros((1, 10, 4), np.float32)
    classes = np.zeros((1, 10), np.float32)
    scores = np.zeros((1, 10), np.float32)
    for i, (cls, score, yxyx) in enumerate(rows):
        boxes[0, i] = yxyx
        classes[0, i] = cls
        scores[0, i] = score
    return [boxes, classes, scores, np.array([count], np.float32)]


def test_ssd_postprocess_reorders_boxes_thresholds_and_respects_count() -> None:
    decoder = make_decoder(SsdPostprocessDecoder(), ["person", "car", "dog"], SSD_INFOS)
    outputs = _ssd_outputs(
        [
            (1.0, 0.6, (0.1, 0.2, 0.3, 0.4)),
            (0.0, 0.9, (0.5, 0.6, 0.7, 0.8)),
            (2.0, 0.3, (0.0, 0.0, 1.0, 1.0)),  # below min_score
            (0.0, 0.99, (0.0, 0.0, 0.5, 0.5)),  # beyond count
        ],
        count=3,
    )
    got = decoder.decode(outputs, 0.5)
    assert [d[0] for d in got] == [0, 1]
    assert [d[1] for d in got] == pytest.approx([0.9, 0.6])
    assert got[0][2] == pytest.approx((0.6, 0.5, 0.8, 0.7))  # xmin, ymin, xmax, ymax
    assert got[1][2] == pytest.approx((0.2, 0.1, 0.4, 0.3))
    assert len(decoder.decode(outputs, 0.2)) == 3
    assert decoder.decode(outputs, 0.95) == []


def test_ssd_postprocess_applies_label_offset_and_drops_unknown_classes() -> None:
    spec = SsdPostprocessDecoder(label_offset=-1)  # model class 1 = first label
    decoder = make_decoder(spec, ["person", "car"], SSD_INFOS)
    outputs = _ssd_outputs(
        [
            (1.0, 0.8, (0.1, 0.1, 0.2, 0.2)),
            (2.0, 0.7, (0.3, 0.3, 0.4, 0.4)),
            (5.0, 0.9, (0, 0, 1, 1)),
        ],
        count=3,
    )
    got = decoder.decode(outputs, 0.5)
    assert [d[0] for d in got] == [0, 1]


def test_ssd_postprocess_output_indices_follow_the_manifest() -> None:
    spec = SsdPostprocessDecoder(boxes_output=1, classes_output=3, scores_output=0, count_output=2)
    infos = [SSD_INFOS[2], SSD_INFOS[0], SSD_INFOS[3], SSD_INFOS[1]]
    decoder = make_decoder(spec, ["a", "b"], infos)
    boxes, classes, scores, count = _ssd_outputs([(1.0, 0.8, (0.1, 0.2, 0.3, 0.4))], count=1)
    got = decoder.decode({0: scores, 1: boxes, 2: count, 3: classes}, 0.5)
    assert len(got) == 1
    assert got[0][0] == 1
    assert got[0][1] == pytest.approx(0.8)
    assert got[0][2] == pytest.approx((0.2, 0.1, 0.4, 0.3))
    assert sorted(decoder.output_indices) == [0, 1, 2, 3]
    with pytest.raises(ModelError, match=r"decoder.count_output is 7"):
        make_decoder(SsdPostprocessDecoder(count_output=7), ["a"], SSD_INFOS)


# --- YOLO -------------------------------------------------------------------------------

LABELS3 = ["person", "car", "dog"]


def _yolo_rows(
    rows: list[tuple[tuple[float, float, float, float], list[float]]],
) -> npt.NDArray[np.float32]:
    """[N, 4+C] rows: (cx, cy, w, h) + class scores (v5: objectness first)."""
    return np.array([[*box, *scores] for box, scores in rows], np.float32)


def _expected_box(
    cx: float, cy: float, w: float, h: float, size: float = 640.0
) -> tuple[float, ...]:
    return ((cx - w / 2) / size, (cy - h / 2) / size, (cx + w / 2) / size, (cy + h / 2) / size)


V8_ROWS = [
    ((100.0, 100.0, 80.0, 80.0), [0.9, 0.1, 0.0]),  # person, kept
    ((104.0, 100.0, 80.0, 80.0), [0.8, 0.0, 0.0]),  # person overlapping -> suppressed
    ((102.0, 100.0, 80.0, 80.0), [0.0, 0.7, 0.0]),  # car, same place -> kept (class-wise)
    ((400.0, 300.0, 60.0, 120.0), [0.0, 0.0, 0.6]),  # dog, kept
    ((500.0, 500.0, 50.0, 50.0), [0.3, 0.2, 0.1]),  # below threshold
]


def _check_v8(got: list[RawDetection]) -> None:
    assert [(d[0], round(d[1], 3)) for d in got] == [(0, 0.9), (1, 0.7), (2, 0.6)]
    assert got[0][2] == pytest.approx(_expected_box(100, 100, 80, 80))
    assert got[2][2] == pytest.approx(_expected_box(400, 300, 60, 120))


def test_yolo_v8_channels_first_decodes_with_classwise_nms() -> None:
    data = _yolo_rows(V8_ROWS).T[None].copy()  # [1, 4+C, N]
    decoder = make_decoder(
        YoloDecoder(), LABELS3, [info("output0", data.shape)], input_size=(640, 640)
    )
    _check_v8(decoder.decode([data], 0.5))
    assert len(decoder.decode([data], 0.05)) == 4  # the low row joins; overlap still suppressed


def test_yolo_v8_rows_layout_gives_the_same_result() -> None:
    data = _yolo_rows(V8_ROWS)[None]  # [1, N, 4+C]
    decoder = make_decoder(
        YoloDecoder(), LABELS3, [info("output0", data.shape)], input_size=(640, 640)
    )
    _check_v8(decoder.decode([data], 0.5))


def test_yolo_normalized_boxes_are_not_rescaled() -> None:
    data = _yolo_rows([((0.5, 0.5, 0.2, 0.4), [0.0, 0.95, 0.0])]).T[None].copy()
    decoder = make_decoder(YoloDecoder(normalized=True), LABELS3, [info("out", data.shape)])
    (got,) = decoder.decode([data], 0.5)
    assert got[0] == 1
    assert got[2] == pytest.approx((0.4, 0.3, 0.6, 0.7))


def test_yolo_v5_multiplies_objectness_and_class_score() -> None:
    rows = _yolo_rows(
        [
            ((320.0, 320.0, 100.0, 100.0), [0.9, 0.1, 0.8, 0.1]),  # 0.9*0.8 = 0.72 car
            ((322.0, 320.0, 100.0, 100.0), [0.8, 0.1, 0.9, 0.0]),  # 0.72 car, overlaps -> gone
            ((100.0, 100.0, 40.0, 40.0), [0.4, 1.0, 0.0, 0.0]),  # obj 0.4 < 0.5
            ((500.0, 100.0, 40.0, 40.0), [0.95, 0.6, 0.0, 0.0]),  # 0.57 person
        ]
    )
    data = rows[None]  # [1, N, 5+C]
    decoder = make_decoder(
        YoloDecoder(layout="v5"), LABELS3, [info("output", data.shape)], input_size=(640, 640)
    )
    got = decoder.decode([data], 0.5)
    assert [(d[0], round(d[1], 3)) for d in got] == [(1, 0.72), (0, 0.57)]
    assert got[0][2] == pytest.approx(_expected_box(320, 320, 100, 100))


def test_yolo_output_not_matching_the_labels_is_rejected() -> None:
    with pytest.raises(ModelError, match=r"expected \[1, 4\+C, N\] with C = 3 labels"):
        make_decoder(
            YoloDecoder(), LABELS3, [info("output0", (1, 84, 8400))], input_size=(640, 640)
        )
    with pytest.raises(ModelError, match="needs the model input size"):
        make_decoder(YoloDecoder(), LABELS3, [info("output0", (1, 7, 8400))])


def test_yolo_quantized_output_is_dequantized() -> None:
    real = _yolo_rows([((0.5, 0.5, 0.2, 0.2), [0.0, 0.0, 0.9])]).T[None]
    scale, zero_point = 1 / 250, -100
    raw = np.clip(np.round(real / scale) + zero_point, -128, 127).astype(np.int8)
    out = info("out", raw.shape, np.int8, scale=scale, zero_point=zero_point)
    decoder = make_decoder(YoloDecoder(normalized=True), LABELS3, [out])
    (got,) = decoder.decode([raw], 0.5)
    assert got[0] == 2
    assert got[1] == pytest.approx(0.9, abs=0.01)
    assert got[2] == pytest.approx((0.4, 0.4, 0.6, 0.6), abs=0.01)


def test_yolo_many_candidates_are_capped_and_stay_classwise() -> None:
    rng = np.random.default_rng(3)
    n = 8400
    centres = rng.random((n, 2)) * 640
    sizes = 20 + rng.random((n, 2)) * 60
    scores = rng.random((n, 3)).astype(np.float32)
    data = np.concatenate([centres, sizes, scores], axis=1).astype(np.float32).T[None].copy()
    decoder = make_decoder(YoloDecoder(), LABELS3, [info("o", data.shape)], input_size=(640, 640))
    got = decoder.decode([data], 0.25)
    assert 0 < len(got) <= 300
    assert all(d[1] >= 0.25 for d in got)
    assert got == sorted(got, key=lambda d: -d[1])
    boxes_by_class: dict[int, list[tuple[float, float, float, float]]] = {}
    for label, _score, box in got:
        for other in boxes_by_class.get(label, []):
            assert iou(box, other) < 0.45
        boxes_by_class.setdefault(label, []).append(box)
    assert math.isfinite(got[0][1])
