"""Detector backends: real inference on the shipped BlazeFace models, and clear errors.

Expected numbers come from shared/assets/README.md (astronaut: fp16 score 0.9226, int8
0.9054; no face >= 0.5 on coffee, rocket, chelsea).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from inference.backends import BACKENDS, create_backend
from inference.decoders import make_decoder
from inference.decoders.nms import iou
from inference.detector import Detector, load_detector
from inference.errors import BackendUnavailableError, ModelError
from protocol import BlazeFaceDecoder
from tests import images

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "inference" / "assets"
TFLITE_VENV_PYTHON = REPO / ".venv-tflite" / "bin" / "python"
MANIFESTS = {
    "int8": ASSETS / "blazeface-short-int8.json",
    "fp16": ASSETS / "blazeface-short-fp16.json",
    "onnx": ASSETS / "blazeface-short-onnx.json",
}
MODEL_FILES = {
    "int8": ASSETS / "blazeface-short-int8.tflite",
    "fp16": ASSETS / "blazeface-short-fp16.tflite",
    "onnx": ASSETS / "blazeface-short.onnx",
}
README_SCORES = {"int8": 0.9054, "fp16": 0.9226, "onnx": 0.9226}
NON_FACE_IMAGES = ["coffee", "rocket", "chelsea"]


def bgr_image(name: str) -> npt.NDArray[Any]:
    rgb = np.ascontiguousarray(images.image(name)[..., :3])
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def detectors() -> Iterator[dict[str, Detector]]:
    loaded = {key: load_detector(path) for key, path in MANIFESTS.items()}
    yield loaded
    for detector in loaded.values():
        detector.close()


@pytest.fixture(scope="module")
def astronaut() -> npt.NDArray[Any]:
    return bgr_image("astronaut")


@pytest.mark.parametrize("model", sorted(MANIFESTS))
def test_each_shipped_model_finds_the_one_astronaut_face(
    detectors: dict[str, Detector], astronaut: npt.NDArray[Any], model: str
) -> None:
    result = detectors[model].detect(astronaut)
    assert len(result.detections) == 1, result.detections
    face = result.detections[0]
    assert face.label == "face"
    assert face.score >= 0.75
    assert face.score == pytest.approx(README_SCORES[model], abs=0.002)
    assert result.infer_ms > 0.0


@pytest.mark.parametrize("model", ["int8", "onnx"])
def test_int8_and_onnx_boxes_agree_with_fp16(
    detectors: dict[str, Detector], astronaut: npt.NDArray[Any], model: str
) -> None:
    reference = detectors["fp16"].detect(astronaut).detections[0].box
    box = detectors[model].detect(astronaut).detections[0].box
    assert iou(box, reference) >= 0.8
    assert reference == pytest.approx((0.352, 0.161, 0.535, 0.344), abs=0.001)


@pytest.mark.parametrize("image", NON_FACE_IMAGES)
@pytest.mark.parametrize("model", sorted(MANIFESTS))
def test_no_face_is_found_in_images_without_faces(
    detectors: dict[str, Detector], model: str, image: str
) -> None:
    result = detectors[model].detect(bgr_image(image))
    assert [d for d in result.detections if d.score >= 0.5] == []


@pytest.mark.parametrize("model", sorted(MODEL_FILES))
def test_outputs_are_found_by_name_in_every_shipped_model(model: str) -> None:
    backend_name = "onnx" if model == "onnx" else "litert"
    with create_backend(backend_name, MODEL_FILES[model]) as backend:
        assert [o.name for o in backend.outputs] == ["regressors", "classificators"]
        info = backend.inputs[0]
        backend.set_input(np.zeros(info.shape, info.dtype))
        backend.invoke()
        regressors = backend.output_by_name("regressors")
        scores = backend.output_by_name("classificators")
        assert regressors.shape == (1, 896, 16)
        assert scores.shape == (1, 896, 1)
        assert np.array_equal(scores, backend.output(backend.output_index("classificators")))
        with pytest.raises(ModelError, match=r"no output named 'boxes'.*'regressors'"):
            backend.output_by_name("boxes")


def test_int8_tensor_info_carries_the_quantization() -> None:
    with create_backend("litert", MODEL_FILES["int8"]) as backend:
        (inp,) = backend.inputs
        assert (inp.name, inp.shape) == ("input", (1, 128, 128, 3))
        assert inp.dtype == np.dtype(np.uint8)
        assert inp.scale == pytest.approx(2 / 255)
        assert inp.zero_point == 127
        scores = backend.outputs[backend.output_index("classificators")]
        assert scores.dtype == np.int8
        assert scores.scale == pytest.approx(0.1254902)
        assert scores.zero_point == -1
    with create_backend("litert", MODEL_FILES["fp16"]) as backend:
        assert backend.inputs[0].dtype == np.float32
        assert not backend.inputs[0].quantized
        assert backend.outputs[0].scale is None


def test_output_returned_to_the_caller_does_not_block_the_next_invoke() -> None:
    with create_backend("litert", MODEL_FILES["int8"]) as backend:
        backend.set_input(np.zeros((1, 128, 128, 3), np.uint8))
        backend.invoke()
        held = backend.output(1)
        before = held.copy()
        backend.set_input(np.full((1, 128, 128, 3), 255, np.uint8))
        backend.invoke()  # would raise if `held` were a view into the interpreter
        assert np.array_equal(held, before)
        assert not np.array_equal(backend.output(1), before)


def test_closed_backend_raises_a_model_error() -> None:
    backend = create_backend("litert", MODEL_FILES["int8"])
    backend.close()
    with pytest.raises(ModelError, match="closed"):
        backend.invoke()


def test_registry_is_immutable_and_lists_the_four_backends() -> None:
    assert sorted(BACKENDS) == ["litert", "onnx", "tensorrt", "tflite"]
    with pytest.raises(TypeError):
        BACKENDS["x"] = "y:Z"  # type: ignore[index]


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown detector backend 'openvino'.*litert, onnx"):
        create_backend("openvino", MODEL_FILES["int8"])


@pytest.mark.parametrize("backend", ["litert", "onnx"])
def test_missing_model_file_is_named(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / ("nope.onnx" if backend == "onnx" else "nope.tflite")
    with pytest.raises(ModelError, match=rf"model file {missing} not found") as err:
        create_backend(backend, missing)
    assert not isinstance(err.value, BackendUnavailableError)


@pytest.mark.parametrize(("backend", "name"), [("litert", "bad.tflite"), ("onnx", "bad.onnx")])
@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_model_file_is_a_model_error_naming_it(
    tmp_path: Path, backend: str, name: str, content: str
) -> None:
    path = tmp_path / name
    if content == "garbage":
        path.write_bytes(b"this is not a model" * 100)
    else:
        source = MODEL_FILES["onnx" if backend == "onnx" else "int8"]
        path.write_bytes(source.read_bytes()[:5000])
    with pytest.raises(ModelError, match=rf"{path} cannot be loaded by the '{backend}' backend"):
        create_backend(backend, path)


def test_model_of_the_wrong_format_is_rejected_before_loading() -> None:
    with pytest.raises(ModelError, match=r"is not a \.tflite file"):
        create_backend("litert", MODEL_FILES["onnx"])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_tensorrt_not_installed_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError) as err:
        create_backend("tensorrt", tmp_path / "model.engine")
    message = str(err.value)
    assert "install edgefleet[tensorrt] on a Jetson (TensorRT ships with JetPack)" in message
    assert "NVIDIA GPU" in message


@pytest.mark.skipif(
    importlib.util.find_spec("tflite_runtime") is not None,
    reason="tflite-runtime is installed in this environment",
)
def test_tflite_runtime_missing_says_what_to_install() -> None:
    with pytest.raises(
        BackendUnavailableError, match=r"pip install tflite-runtime \(needs numpy<2\)"
    ):
        create_backend("tflite", MODEL_FILES["int8"])


@pytest.mark.parametrize(
    ("backend", "module", "model", "advice"),
    [
        ("litert", "ai_edge_litert", "int8", "pip install ai-edge-litert"),
        ("onnx", "onnxruntime", "onnx", "pip install 'edgefleet[onnx]'"),
    ],
)
def test_missing_runtime_says_what_to_install(
    backend: str, module: str, model: str, advice: str
) -> None:
    # The runtime is made unimportable in a child process (a deliberately injected fault).
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from pathlib import Path\n"
        "from inference.backends import create_backend\n"
        "from inference.errors import BackendUnavailableError\n"
        "try:\n"
        f"    create_backend({backend!r}, Path({str(MODEL_FILES[model])!r}))\n"
        "except BackendUnavailableError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert advice in proc.stdout


def test_backend_and_decoder_modules_import_without_opencv() -> None:
    code = (
        "import sys; sys.modules['cv2'] = None\n"
        "import inference.backends, inference.backends.litert, inference.backends.tflite\n"
        "import inference.backends.onnx, inference.backends.tensorrt\n"
        "import inference.decoders.blazeface, inference.decoders.ssd_postprocess, inference.decoders.yolo\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# --- tflite-runtime, in its own venv (it needs numpy < 2) -----------------------------


def _run_probe(model: Path, tensor: npt.NDArray[Any], tmp_path: Path) -> tuple[dict[str, Any], Any]:
    if not TFLITE_VENV_PYTHON.exists():
        pytest.fail(
            f"{TFLITE_VENV_PYTHON} is missing, so the tflite-runtime backend cannot be tested: "
            "run make test (it builds .venv-tflite)"
        )
    np.save(tmp_path / "input.npy", tensor)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            str(TFLITE_VENV_PYTHON),
            str(REPO / "tests" / "tflite_probe.py"),
            str(model),
            str(tmp_path / "input.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"the tflite-runtime probe failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
            "if tflite-runtime is not installed in .venv-tflite, run make test (it builds "
            ".venv-tflite); tflite-runtime 2.14 has wheels for CPython 3.9-3.11 only"
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, np.load(tmp_path / "out.npz")


@pytest.mark.parametrize("model", ["int8", "fp16"])
def test_tflite_runtime_backend_agrees_with_litert(
    detectors: dict[str, Detector],
    astronaut: npt.NDArray[Any],
    tmp_path: Path,
    model: str,
) -> None:
    detector = detectors[model]
    prepared = detector.preprocess(astronaut)
    report, outputs = _run_probe(MODEL_FILES[model], prepared.tensor, tmp_path)
    assert report["backend"] == "tflite"
    assert report["cv2_loaded"] is False
    assert report["numpy"].startswith("1.")
    assert all(report["output_by_name_matches"].values())
    assert [o["name"] for o in report["outputs"]] == ["regressors", "classificators"]

    backend = detector.backend
    backend.set_input(prepared.tensor)
    backend.invoke()
    ours = {name: backend.output_by_name(name) for name in ("regressors", "classificators")}
    theirs = {name: outputs[name] for name in ours}
    if model == "fp16":
        for name, array in ours.items():
            np.testing.assert_allclose(theirs[name], array, rtol=1e-4, atol=1e-4)
    else:
        # tflite-runtime 2.14 and LiteRT 2.3 round some int8 kernels differently; the rows
        # that matter (face logits) stay within two quantization steps.
        a = ours["classificators"].reshape(-1).astype(int)
        b = theirs["classificators"].reshape(-1).astype(int)
        top = np.flatnonzero(a >= 0)
        assert top.size > 0
        assert np.abs(a[top] - b[top]).max() <= 2

    assert isinstance(detector.manifest.decoder, BlazeFaceDecoder)
    decoder = make_decoder(detector.manifest.decoder, ["face"], backend.outputs)
    ref = decoder.decode([ours["regressors"], ours["classificators"]], 0.5)
    got = decoder.decode([theirs["regressors"], theirs["classificators"]], 0.5)
    assert len(ref) == len(got) == 1
    assert got[0][1] == pytest.approx(ref[0][1], abs=0.02)
    assert iou(got[0][2], ref[0][2]) >= 0.8


def test_tflite_probe_reports_a_missing_model_clearly(tmp_path: Path) -> None:
    if not TFLITE_VENV_PYTHON.exists():
        pytest.fail("run make test (it builds .venv-tflite)")
    np.save(tmp_path / "input.npy", np.zeros((1, 128, 128, 3), np.uint8))
    proc = subprocess.run(
        [
            str(TFLITE_VENV_PYTHON),
            str(REPO / "tests" / "tflite_probe.py"),
            str(tmp_path / "missing.tflite"),
            str(tmp_path / "input.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "missing.tflite not found" in proc.stderr
