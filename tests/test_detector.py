"""Detector: preprocessing (quantization paths, letterbox), manifest checks, the shipped video."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from inference.backends import TensorInfo
from inference.detector import Detector, load_detector
from inference.errors import ModelError
from inference.preprocess import Prepared, Preprocessor, quantize_pixels
from protocol import InputSpec
from tests import images

ASSETS = Path(__file__).resolve().parent.parent / "inference" / "assets"
INT8 = ASSETS / "blazeface-short-int8.json"
FP16 = ASSETS / "blazeface-short-fp16.json"
ONNX = ASSETS / "blazeface-short-onnx.json"
VIDEO = ASSETS / "face-walk-640x480.mp4"


def astronaut_bgr() -> npt.NDArray[Any]:
    rgb = images.astronaut()
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def random_frame(seed: int, height: int = 480, width: int = 640) -> npt.NDArray[Any]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def nhwc(dtype: Any, **quant: Any) -> TensorInfo:
    return TensorInfo(name="input", shape=(1, 128, 128, 3), dtype=np.dtype(dtype), **quant)


@pytest.fixture(scope="module")
def int8() -> Iterator[Detector]:
    with load_detector(INT8) as detector:
        yield detector


# --- preprocessing ---------------------------------------------------------------------


def test_int8_model_gets_raw_pixels_within_one_of_the_generic_quantization(
    int8: Detector,
) -> None:
    assert int8.preprocessor.mode == "raw"
    frame = random_frame(1)
    prepared = int8.preprocess(frame)
    assert prepared.tensor.shape == (1, 128, 128, 3)
    assert prepared.tensor.dtype == np.uint8
    assert int8.manifest.input.interpolation == "area-fast"
    twice = cv2.resize(frame, (256, 256), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(
        cv2.resize(twice, (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    generic = quantize_pixels(rgb, mean=127.5, std=127.5, info=int8.backend.inputs[0])
    diff = prepared.tensor[0].astype(int) - generic.astype(int)
    assert diff.min() >= 0
    assert diff.max() <= 1
    assert np.array_equal(prepared.tensor[0], rgb)


def test_int8_tensor_with_pixel_minus_128_uses_a_bit_flip() -> None:
    info = nhwc(np.int8, scale=2 / 255, zero_point=-1)
    pre = Preprocessor(InputSpec(width=128, height=128), info)
    assert pre.mode == "flip"
    frame = random_frame(2)
    tensor = pre(frame).tensor[0]
    assert tensor.dtype == np.int8
    rgb = cv2.cvtColor(
        cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    generic = quantize_pixels(rgb, mean=127.5, std=127.5, info=info)
    assert np.abs(tensor.astype(int) - generic.astype(int)).max() <= 1


def test_other_quantization_goes_through_the_exact_lookup_table() -> None:
    info = nhwc(np.uint8, scale=0.0186, zero_point=114)  # ImageNet-ish std
    spec = InputSpec(width=128, height=128, mean=123.7, std=58.4)
    pre = Preprocessor(spec, info)
    assert pre.mode == "lut"
    frame = random_frame(3)
    rgb = cv2.cvtColor(
        cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    assert np.array_equal(
        pre(frame).tensor[0], quantize_pixels(rgb, mean=123.7, std=58.4, info=info)
    )


def test_float_models_get_normalized_float32_in_their_layout() -> None:
    frame = random_frame(4)
    rgb = cv2.cvtColor(
        cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    expected = (rgb.astype(np.float32) - 127.5) / 127.5
    nhwc_pre = Preprocessor(InputSpec(width=128, height=128), nhwc(np.float32))
    got = nhwc_pre(frame).tensor
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    nchw_info = TensorInfo(name="input", shape=(1, 3, 128, 128), dtype=np.dtype(np.float32))
    nchw_pre = Preprocessor(InputSpec(width=128, height=128, layout="nchw"), nchw_info)
    planar = nchw_pre(frame).tensor
    assert planar.shape == (1, 3, 128, 128)
    assert planar.flags.c_contiguous
    np.testing.assert_allclose(planar[0], expected.transpose(2, 0, 1), atol=1e-6)


def test_bgr_models_keep_the_channel_order() -> None:
    frame = random_frame(5)
    pre = Preprocessor(
        InputSpec(width=128, height=128, color="bgr"), nhwc(np.uint8, scale=2 / 255, zero_point=127)
    )
    assert np.array_equal(
        pre(frame).tensor[0], cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA)
    )


def test_preprocessor_rejects_an_input_that_does_not_match_the_manifest() -> None:
    with pytest.raises(ModelError, match=r"has shape \[1, 3, 128, 128\].*fix input"):
        Preprocessor(
            InputSpec(width=128, height=128),
            TensorInfo(name="input", shape=(1, 3, 128, 128), dtype=np.dtype(np.float32)),
        )


def test_gray_frames_are_accepted_and_wrong_frames_are_a_clear_error() -> None:
    pre = Preprocessor(InputSpec(width=128, height=128), nhwc(np.float32))
    gray = np.full((60, 80), 200, np.uint8)
    assert pre(gray).tensor.shape == (1, 128, 128, 3)
    with pytest.raises(ModelError, match="expected a BGR uint8 frame"):
        pre(np.zeros((60, 80, 3), np.float32))


def test_letterbox_maps_a_box_back_to_the_original_frame() -> None:
    spec = InputSpec(width=128, height=128, resize="letterbox")
    pre = Preprocessor(spec, nhwc(np.uint8, scale=2 / 255, zero_point=127))
    frame = np.zeros((480, 640, 3), np.uint8)
    x0, y0, x1, y1 = 200, 100, 360, 260  # a white square, pixels [x0, x1) x [y0, y1)
    frame[y0:y1, x0:x1] = 255
    prepared = pre(frame)
    # 640x480 -> 128x96, 16 rows of padding above and below
    assert (prepared.scale_x, prepared.offset_x) == (1.0, 0.0)
    assert prepared.scale_y == pytest.approx(128 / 96)
    assert prepared.offset_y == pytest.approx(-16 / 96)
    image = prepared.tensor[0]
    assert (image[:16] == 114).all()
    assert (image[-16:] == 114).all()
    rows = np.flatnonzero(image[:, :, 0].max(axis=1) > 200)
    cols = np.flatnonzero(image[:, :, 0].max(axis=0) > 200)
    model_box = (cols[0] / 128, rows[0] / 128, (cols[-1] + 1) / 128, (rows[-1] + 1) / 128)
    back = prepared.to_frame(model_box)
    assert back == pytest.approx((x0 / 640, y0 / 480, x1 / 640, y1 / 480), abs=1 / 128)


def test_letterbox_of_a_tall_frame_pads_the_sides() -> None:
    pre = Preprocessor(InputSpec(width=128, height=128, resize="letterbox"), nhwc(np.float32))
    prepared = pre(np.zeros((400, 200, 3), np.uint8))
    # 200x400 -> 64x128, 32 columns either side
    assert prepared.to_frame((0.25, 0.0, 0.75, 1.0)) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert (prepared.frame_width, prepared.frame_height) == (200, 400)


def test_preprocess_is_thread_safe(int8: Detector) -> None:
    frames = [random_frame(seed) for seed in range(8)]
    expected = [int8.preprocess(f).tensor.copy() for f in frames]
    results: dict[tuple[int, int], npt.NDArray[Any]] = {}
    barrier = threading.Barrier(4)

    def work(worker: int) -> None:
        barrier.wait(timeout=10)
        for _ in range(10):
            for i, frame in enumerate(frames):
                results[(worker, i)] = int8.preprocess(frame).tensor

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 32
    for (_, i), tensor in results.items():
        assert np.array_equal(tensor, expected[i])


# --- the detector ------------------------------------------------------------------------


def test_detector_reports_frame_normalized_rounded_boxes(int8: Detector) -> None:
    assert int8.ref == "blazeface-short-int8@1.0.0"
    assert int8.backend_name == "litert"
    assert int8.min_score == 0.5
    result = int8.detect(astronaut_bgr())
    (face,) = result.detections
    assert face.label == "face"
    assert face.score == 0.9054
    assert face.box == pytest.approx((0.348, 0.159, 0.536, 0.346), abs=0.001)
    assert all(v == round(v, 4) and 0.0 <= v <= 1.0 for v in face.box)
    assert result.infer_ms > 0.0


def test_detector_boxes_follow_the_letterbox_back_to_the_frame() -> None:
    # The astronaut's face pasted at the right of a 2:1 black frame: letterboxed, the model
    # sees it undistorted, and the box must land where the face is in the wide frame.
    face_crop = cv2.resize(astronaut_bgr()[30:230, 150:350], (300, 300))
    frame = np.zeros((300, 600, 3), np.uint8)
    frame[:, 300:] = face_crop
    manifest = json.loads(INT8.read_text())
    manifest["input"]["resize"] = "letterbox"
    with (
        load_detector(INT8) as plain,
        _with_manifest(manifest) as path,
        load_detector(path) as boxed,
    ):
        (ref,) = plain.detect(face_crop).detections
        (face,) = boxed.detect(frame).detections
    expected = (0.5 + ref.box[0] / 2, ref.box[1], 0.5 + ref.box[2] / 2, ref.box[3])
    # The model sees the face at half the size, so its box differs a little; a wrong
    # mapping would be off by a quarter of the frame height (the padding) or more.
    assert face.box == pytest.approx(expected, abs=0.04)
    assert face.box[0] > 0.5


def test_min_score_override_filters_detections() -> None:
    with load_detector(INT8, min_score=0.95) as strict:
        assert strict.detect(astronaut_bgr()).detections == []
        assert len(strict.infer(strict.preprocess(astronaut_bgr()), min_score=0.5).detections) == 1


@pytest.mark.parametrize("manifest", [FP16, ONNX])
def test_float_detectors_find_the_face(manifest: Path) -> None:
    with load_detector(manifest) as detector:
        (face,) = detector.detect(astronaut_bgr()).detections
        assert face.score == pytest.approx(0.9226, abs=0.003)  # assets README, INTER_AREA


def _face_square(i: int) -> tuple[float, float, float, float]:
    """Where make_assets.py pasted the 200x200 astronaut crop in frame i (normalized)."""
    x = round(i * 440 / 149)
    y = 140 + round(60 * math.sin(2 * math.pi * i / 150))
    return (x / 640, y / 480, (x + 200) / 640, (y + 200) / 480)


def test_int8_detector_follows_the_face_schedule_of_the_shipped_video(int8: Detector) -> None:
    cap = cv2.VideoCapture(str(VIDEO))
    assert cap.isOpened()
    checked = 0
    try:
        for index in range(150):
            ok, frame = cap.read()
            assert ok, f"video ended at frame {index}"
            if index % 5:
                continue
            checked += 1
            face_present = (index // 30) % 2 == 0
            detections = int8.detect(frame).detections
            if not face_present:
                assert detections == [], f"frame {index}: unexpected {detections}"
                continue
            assert len(detections) == 1, f"frame {index}: {detections}"
            x0, y0, x1, y1 = detections[0].box
            sx0, sy0, sx1, sy1 = _face_square(index)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            assert sx0 <= cx <= sx1, f"frame {index}: face x {cx} outside {sx0}..{sx1}"
            assert sy0 <= cy <= sy1, f"frame {index}: face y {cy} outside {sy0}..{sy1}"
    finally:
        cap.release()
    assert checked == 30


# --- loading errors ----------------------------------------------------------------------


@contextlib.contextmanager
def _with_manifest(manifest: dict[str, Any]) -> Iterator[Path]:
    """A temporary bundle folder: the int8 model plus the given manifest (dict)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(ASSETS / "blazeface-short-int8.tflite", folder)
        path = folder / "manifest.json"
        path.write_text(json.dumps(manifest))
        yield path


def _bundle(tmp_path: Path, source: Path = INT8) -> Path:
    manifest = json.loads(source.read_text())
    shutil.copy(ASSETS / manifest["model"], tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=rf"model manifest {tmp_path / 'nope.json'} not found"):
        load_detector(tmp_path / "nope.json")


def test_invalid_manifest_becomes_a_model_error_naming_the_file(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    manifest = json.loads(path.read_text())
    manifest["colour"] = "rgb"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=rf"model manifest {path} is invalid: .*colour"):
        load_detector(path)


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    (tmp_path / "blazeface-short-int8.tflite").unlink()
    with pytest.raises(ModelError, match=r"blazeface-short-int8.tflite .* not found"):
        load_detector(path)


def test_model_file_of_the_wrong_size_is_rejected(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    model = tmp_path / "blazeface-short-int8.tflite"
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"is 184372 bytes but the manifest says 184472"):
        load_detector(path)


def test_verify_checks_the_sha256(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    model = tmp_path / "blazeface-short-int8.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    model.write_bytes(bytes(data))
    with load_detector(path):  # sizes only by default
        pass
    with pytest.raises(ModelError, match=r"has sha256 .* but the manifest says fb00cc08"):
        load_detector(path, verify=True)


def test_verify_passes_on_the_shipped_bundles() -> None:
    for manifest in (INT8, FP16, ONNX):
        load_detector(manifest, verify=True).close()


def test_backend_that_cannot_read_the_model_format_is_refused() -> None:
    with pytest.raises(ModelError, match=r"is a onnx model; the 'litert' backend cannot run it"):
        load_detector(ONNX, backend="litert")


def test_unknown_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(
        ModelError, match=r"unknown detector backend 'edgetpu'.*litert, onnx, tensorrt, tflite"
    ):
        load_detector(INT8, backend="edgetpu")


def test_decoder_that_does_not_fit_the_model_names_the_manifest(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    manifest = json.loads(path.read_text())
    manifest["decoder"]["scores_output"] = "scores"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=rf"{path}: the model has no scores output named 'scores'"):
        load_detector(path)


def test_prepared_is_frozen(int8: Detector) -> None:
    prepared = int8.preprocess(random_frame(9, 48, 64))
    assert isinstance(prepared, Prepared)
    assert (prepared.frame_width, prepared.frame_height) == (64, 48)
    with pytest.raises(AttributeError):
        prepared.frame_width = 1  # type: ignore[misc]


def test_area_fast_resize_stays_within_a_grey_level_of_inter_area_on_the_video() -> None:
    info = nhwc(np.uint8, scale=2 / 255, zero_point=127)
    exact = Preprocessor(InputSpec(width=128, height=128, interpolation="area"), info)
    fast = Preprocessor(InputSpec(width=128, height=128, interpolation="area-fast"), info)
    cap = cv2.VideoCapture(str(VIDEO))
    diffs = []
    for _ in range(0, 150, 10):
        ok, frame = cap.read()
        assert ok
        a = exact(frame).tensor.astype(int)
        b = fast(frame).tensor.astype(int)
        diffs.append(np.abs(a - b).mean())
        cap.set(cv2.CAP_PROP_POS_FRAMES, cap.get(cv2.CAP_PROP_POS_FRAMES) + 9)
    cap.release()
    assert max(diffs) < 1.5
    small = random_frame(3)[:200, :200]
    assert np.array_equal(exact(small).tensor, fast(small).tensor), (
        "small frames use plain INTER_AREA"
    )
