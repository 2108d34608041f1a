"""``edgefleet model quantize`` (docs/quantize.md): the shipped fp16 BlazeFace quantized
for real with ai-edge-quantizer, calibrated on scikit-image samples, run through the
agent's offline inference and compared with the float model; and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from controller.bundles import read_bundle, run_local_inference
from controller.quantize import (
    FixRange,
    QuantizeError,
    compare_detections,
    parse_fix_range,
    parse_range,
    prepare_image,
)
from controller.tflite_graph import TFLiteGraphError, graph_facts, to_float32
from protocol import decode_manifest
from tests import images
from tests.controller.conftest import Cli

ASSETS = Path(__file__).resolve().parents[2] / "inference" / "assets"
FP16_MANIFEST = ASSETS / "blazeface-short-fp16.json"
FP16_MODEL = ASSETS / "blazeface-short-fp16.tflite"
INT8_MANIFEST = ASSETS / "blazeface-short-int8.json"
# BlazeFace's score head: calibrated on mostly face-free images its range ends below 0
# and every face logit is clipped (score <= 0.5); give it the logit range outright.
SCORE_HEAD = ["classificator_8", "classificator_16", "reshape", "reshape_2", "classificators"]
FIX_ARGS = [a for t in SCORE_HEAD for a in ("--fix-range", f"{t}=-16:16")]


def _png(path: Path, rgb: Any) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def calib(work: Path) -> Path:
    """astronaut (a face) plus coffee, rocket and chelsea (none)."""
    folder = work / "calib"
    folder.mkdir()
    for name in ["astronaut", "coffee", "rocket", "chelsea"]:
        _png(folder / f"{name}.png", images.image(name))
    return folder


@pytest.fixture(scope="module")
def face_free(work: Path, calib: Path) -> Path:
    folder = work / "face-free"
    folder.mkdir()
    for name in ["coffee", "rocket", "chelsea"]:
        shutil.copy(calib / f"{name}.png", folder)
    return folder


@pytest.fixture(scope="module")
def cli(work: Path) -> Cli:
    return Cli(work / "home")


@pytest.fixture(scope="module")
def quantized(cli: Cli, work: Path, calib: Path) -> tuple[Path, dict[str, Any]]:
    """The fp16 model quantized once through the CLI, with its JSON report."""
    out = work / "int8"
    result = cli(
        "model", "quantize", str(FP16_MANIFEST), "--calibration", str(calib), "--out", str(out),
        "--golden", str(calib / "astronaut.png"), "--golden", str(calib / "coffee.png"),
        *FIX_ARGS, "--min-agreement", "0.9", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_the_int8_model_has_a_uint8_input_no_standalone_relu_and_is_smaller(
    quantized: tuple[Path, dict[str, Any]],
) -> None:
    out, report = quantized
    model = out / "model.tflite"
    interp = Interpreter(model_path=str(model), num_threads=1)
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, 128, 128, 3]
    scale, zero_point = inp["quantization"]
    assert scale == pytest.approx(2 / 255, rel=1e-4) and zero_point in (127, 128)
    ops = {d["op_name"] for d in interp._get_ops_details()}
    assert "RELU" not in ops and "DEQUANTIZE" not in ops and "CONV_2D" in ops
    # one XNNPACK partition: the fused graph is delegated in one piece
    assert sum(d["op_name"] == "DELEGATE" for d in interp._get_ops_details()) == 1

    size = model.stat().st_size
    assert report["int8_size"] == size < FP16_MODEL.stat().st_size == report["float_size"]
    # the fp16 file is already half of fp32: INT8 weights halve the fp32 model again
    # (per-channel scales and int64 zero points make up the rest)
    assert size <= 0.6 * report["fp32_size"]
    assert report["fp16_constants"] == 74 and report["fused_activations"] == 17
    g = report["int8_graph"]
    assert g["standalone_activations"] == 0 and g["input_dtype"] == "uint8"
    assert g["xnnpack_partitions"] == 1 and g["ops"] < report["float_graph"]["ops"]
    assert report["float_graph"]["standalone_activations"] == 17
    assert report["input_range"] == [-1.0, 1.0]
    assert [f["tensor"] for f in report["fixed_ranges"]] == SCORE_HEAD


def test_the_int8_model_runs_in_the_agent_and_agrees_with_the_float_one(
    quantized: tuple[Path, dict[str, Any]], calib: Path
) -> None:
    out, report = quantized
    manifest = decode_manifest((out / "manifest.json").read_bytes())
    assert manifest.ref == "blazeface-short-int8@1.0.0" and manifest.runtime == "litert"
    assert manifest.model == "model.tflite" and manifest.labels == ["face"]
    assert manifest.decoder == decode_manifest(FP16_MANIFEST.read_bytes()).decoder
    images = [calib / "astronaut.png", calib / "coffee.png"]
    face_q, coffee_q = run_local_inference(out / "manifest.json", images)
    face_f, coffee_f = run_local_inference(FP16_MANIFEST, images)
    assert len(face_f) == len(face_q) == 1 and coffee_f == coffee_q == []
    (pair,) = compare_detections("astronaut", face_f, face_q).pairs
    assert pair.iou >= 0.8 and abs(pair.score_delta) <= 0.1 and pair.agrees
    assert report["agreement"] >= 0.9 and report["ok"] is True
    astronaut, coffee = report["golden"]
    assert astronaut["pairs"][0]["iou"] >= 0.8 and astronaut["agreement"] == 1.0
    assert coffee["int8_detections"] == [] and coffee["agreement"] == 1.0


def test_the_output_folder_packages_as_a_bundle(
    quantized: tuple[Path, dict[str, Any]], cli: Cli, calib: Path, tmp_path: Path
) -> None:
    out, _ = quantized
    efb = tmp_path / "face-int8.efb"
    result = cli(
        "model", "package", str(out / "manifest.json"), "--name", "face-int8",
        "--version", "2.0.0", "--golden", str(calib / "astronaut.png"), "--out", str(efb),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = read_bundle(efb)
    assert info.manifest.ref == "face-int8@2.0.0"
    assert [e[0] for e in info.manifest.golden[0].expected] == ["face"]


def test_a_tflite_source_finds_its_manifest_and_prints_a_summary(
    cli: Cli, calib: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = cli(
        "model", "quantize", str(FP16_MODEL), "--calibration", str(calib), "--out", str(out),
        "--name", "face-q", "--version", "3.1.0", "--max-images", "3", *FIX_ARGS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"wrote {out / 'model.tflite'}" in text and "face-q@3.1.0" in text
    assert "0 stand-alone left, XNNPACK partitions 1" in text
    assert "calibrate 3 images, input range -1:1" in text
    assert "agreement 100%" in text and "nothing found by either model" in text
    assert "next: edgefleet model package" in text
    assert decode_manifest((out / "manifest.json").read_bytes()).ref == "face-q@3.1.0"


def test_face_free_calibration_clips_scores_and_min_agreement_fails_unless_fixed(
    cli: Cli, face_free: Path, calib: Path, tmp_path: Path
) -> None:
    args = ["--calibration", str(face_free), "--golden", str(calib / "astronaut.png")]
    low = cli(
        "model", "quantize", str(FP16_MANIFEST), *args, "--out", str(tmp_path / "a"),
        "--min-agreement", "0.9", "--json",
    )  # fmt: skip
    assert low.exit_code == 1
    assert low.stderr.count("\n") == 1 and low.stderr.startswith("error: golden agreement 0%")
    assert "--fix-range" in low.stderr
    report = json.loads(low.stdout)
    assert report["ok"] is False and report["agreement"] == 0.0
    (pair,) = report["golden"][0]["pairs"]
    assert pair["score_int8"] <= 0.51 < pair["score_float"]  # clipped at logit 0
    assert (tmp_path / "a" / "model.tflite").is_file()  # kept to inspect

    fixed = cli(
        "model", "quantize", str(FP16_MANIFEST), *args, "--out", str(tmp_path / "b"),
        *FIX_ARGS, "--min-agreement", "0.9", "--json",
    )  # fmt: skip
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(fixed.stdout)["agreement"] == 1.0


def _broken_png(tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "frame.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _lonely_tflite(tmp_path: Path) -> Path:
    shutil.copy(FP16_MODEL, tmp_path / "model-without-manifest.tflite")
    return tmp_path / "model-without-manifest.tflite"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "has no images (.bmp, .jpeg, .jpg, .png, .webp)"),
        ("int8", "is not a float model (input 'input' is uint8 quantized)"),
        ("unknown-tensor", "no tensor 'classificatorz'; activation tensors include classificators"),
        ("unreadable", "cannot read calibration image"),
        ("bad-range", "--input-range '1' is not MIN:MAX"),
        ("no-manifest", "has no manifest next to it: pass --manifest-template"),
        ("missing-folder", "calibration folder"),
        ("bad-name", "invalid model name 'Face Model'"),
    ],
)
def test_refusals_are_one_line_errors_and_write_nothing(
    case: str, message: str, cli: Cli, calib: Path, tmp_path: Path
) -> None:
    src, folder, extra = str(FP16_MANIFEST), str(calib), list[str]()
    if case == "empty":
        (tmp_path / "empty").mkdir()
        folder = str(tmp_path / "empty")
    elif case == "int8":
        src = str(INT8_MANIFEST)
    elif case == "unknown-tensor":
        extra = ["--fix-range", "classificatorz=-16:16"]
    elif case == "unreadable":
        folder = str(_broken_png(tmp_path))
    elif case == "bad-range":
        extra = ["--input-range", "1"]
    elif case == "no-manifest":
        src = str(_lonely_tflite(tmp_path))
    elif case == "missing-folder":
        folder = str(tmp_path / "nope")
    elif case == "bad-name":
        extra = ["--name", "Face Model"]
    out = tmp_path / "out"
    result = cli("model", "quantize", src, "--calibration", folder, "--out", str(out), *extra)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_fp32_rewrite_keeps_the_math_of_the_fp16_model() -> None:
    fp16 = FP16_MODEL.read_bytes()
    fp32 = to_float32(fp16)
    assert fp32.io.signature_key == "serving_default" and fp32.io.input_tensor == "input"
    assert fp32.fused_activations == 17 and "classificators" in fp32.io.activations
    facts = graph_facts(fp32.data)
    assert facts.standalone_activations == 0 and facts.op_types.get("DEQUANTIZE", 0) == 0
    bgr = cv2.cvtColor(images.astronaut(), cv2.COLOR_RGB2BGR)
    x = prepare_image(bgr, decode_manifest(FP16_MANIFEST.read_bytes()).input)
    assert x.shape == (1, 128, 128, 3) and -1.0 <= x.min() < x.max() <= 1.0

    def run(**model: Any) -> list[np.ndarray]:
        interp = Interpreter(num_threads=1, **model)
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]

    for a, b in zip(run(model_path=str(FP16_MODEL)), run(model_content=fp32.data), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_an_int8_model_is_refused_by_the_fp32_rewrite() -> None:
    with pytest.raises(TFLiteGraphError, match="not a float model"):
        to_float32((ASSETS / "blazeface-short-int8.tflite").read_bytes())


def test_option_parsing_and_detection_pairing() -> None:
    assert parse_range("-1:1") == (-1.0, 1.0)
    assert parse_fix_range("a/b:0=-16:16.5") == FixRange("a/b:0", -16.0, 16.5)
    for bad in ["2:1", "x:1", "nan:1", "5"]:
        with pytest.raises(QuantizeError):
            parse_range(bad)
    with pytest.raises(QuantizeError, match="TENSOR=MIN:MAX"):
        parse_fix_range("-16:16")
    box = (0.1, 0.1, 0.5, 0.5)
    shifted = (0.15, 0.1, 0.55, 0.5)
    g = compare_detections(
        "x",
        [("face", 0.9, box), ("face", 0.7, (0.6, 0.6, 0.9, 0.9))],
        [("face", 0.88, shifted), ("cat", 0.8, box)],
    )
    assert (
        len(g.pairs) == 1 and g.pairs[0].agrees and g.pairs[0].score_delta == pytest.approx(-0.02)
    )
    assert [d[1] for d in g.only_float] == [0.7] and [d[0] for d in g.only_int8] == ["cat"]
    assert (g.agreed, g.units, g.agreement) == (1, 2, 0.5)
    empty = compare_detections("y", [], [])
    assert (empty.agreed, empty.units) == (1, 1)
    worse = compare_detections("z", [("face", 0.9, box)], [("face", 0.6, box)])
    assert not worse.pairs[0].agrees and worse.agreement == 0.0
