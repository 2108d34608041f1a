"""``edgefleet model init MODEL``: inspect a model and draft a manifest the agent accepts."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from controller.cli import main
from inference import ASSETS_DIR
from inference.backends import TensorInfo
from inference.detector import load_detector
from inference.errors import ModelError
from inference.inspect import ModelSummary, draft_manifest
from protocol import decode_manifest
from tests.video_files import shipped_frames

VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"

INFERABLE_INPUT = ("width", "height", "layout", "color", "resize")
"""Input fields the draft must get right for the shipped models (mean/std are guesses)."""


def _init(*args: str) -> Any:
    return CliRunner().invoke(main, ["model", "init", *args])


def _copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copyfile(ASSETS_DIR / name, target)
    return target


def test_int8_draft_loads_and_detects_like_the_shipped_manifest(tmp_path: Path) -> None:
    model = _copy(tmp_path, "blazeface-short-int8.tflite")
    result = _init(str(model))
    assert result.exit_code == 0, result.output
    draft_path = tmp_path / "blazeface-short-int8.json"
    assert f"wrote {draft_path}" in result.output
    assert "output 1 'classificators': [1, 896, 1] int8, quantized scale" in result.output
    assert "TODO version" in result.output and "TODO min_score" in result.output
    draft = decode_manifest(draft_path.read_bytes())
    shipped = decode_manifest((ASSETS_DIR / "blazeface-short-int8.json").read_bytes())
    assert draft.runtime == shipped.runtime and draft.model == shipped.model
    for name in INFERABLE_INPUT:
        assert getattr(draft.input, name) == getattr(shipped.input, name), name
    assert draft.decoder == shipped.decoder
    assert draft.labels == shipped.labels
    assert draft.files == shipped.files
    assert draft.compatibility == shipped.compatibility
    with (
        load_detector(draft_path) as drafted,
        load_detector(ASSETS_DIR / "blazeface-short-int8.json") as reference,
    ):
        found = 0
        for frame in shipped_frames():
            got, want = drafted.detect(frame).detections, reference.detect(frame).detections
            assert [(d.label, d.score, d.box) for d in got] == [
                (d.label, d.score, d.box) for d in want
            ]
            found += bool(got)
    assert found >= 80  # the face is in 90 of the 150 frames


@pytest.mark.parametrize(
    ("model_file", "shipped_manifest"),
    [
        ("blazeface-short-fp16.tflite", "blazeface-short-fp16.json"),
        ("blazeface-short.onnx", "blazeface-short-onnx.json"),
    ],
)
def test_fp16_and_onnx_drafts_match_the_shipped_manifests(
    tmp_path: Path, model_file: str, shipped_manifest: str
) -> None:
    out = tmp_path / "draft.json"
    result = _init(str(ASSETS_DIR / model_file), "--out", str(out), "--version", "1.0.0")
    assert result.exit_code == 0, result.output
    assert "TODO input.mean/std" in result.output  # a float input: the scaling is a guess
    draft = decode_manifest(out.read_bytes())
    shipped = decode_manifest((ASSETS_DIR / shipped_manifest).read_bytes())
    assert draft.version == "1.0.0"
    assert (draft.runtime, draft.model, draft.decoder, draft.labels, draft.files) == (
        shipped.runtime,
        shipped.model,
        shipped.decoder,
        shipped.labels,
        shipped.files,
    )
    for name in (*INFERABLE_INPUT, "mean", "std"):
        assert getattr(draft.input, name) == getattr(shipped.input, name), name


def test_an_existing_manifest_is_kept_unless_force(tmp_path: Path) -> None:
    model = _copy(tmp_path, "blazeface-short-int8.tflite")
    target = tmp_path / "blazeface-short-int8.json"
    target.write_text("{}", encoding="utf-8")
    result = _init(str(model))
    assert result.exit_code == 1
    assert f"error: {target} exists: pass --force" in result.output
    assert target.read_text() == "{}"
    result = _init(str(model), "--force", "--name", "my-face")
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["name"] == "my-face"


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello", encoding="utf-8")
    result = _init(str(text_file))
    assert result.exit_code == 1 and "is not a .tflite or .onnx model" in result.output
    model = _copy(tmp_path, "blazeface-short-int8.tflite")
    result = _init(str(model), "--name", "Bad Name")
    assert result.exit_code == 1 and "invalid model name 'Bad Name'" in result.output
    assert not (tmp_path / "blazeface-short-int8.json").exists()


def test_onnx_without_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    result = _init(str(ASSETS_DIR / "blazeface-short.onnx"), "--out", "/nonexistent/x.json")
    assert result.exit_code == 1
    assert "pip install 'edgefleet[onnx]'" in result.output
    assert "Traceback" not in result.output


def _summary(*outputs: tuple[str, tuple[int, ...]]) -> ModelSummary:
    float32 = np.dtype(np.float32)
    return ModelSummary(
        path=ASSETS_DIR / "blazeface-short-fp16.tflite",
        runtime="litert",
        inputs=[TensorInfo("images", (1, 640, 640, 3), float32)],
        outputs=[TensorInfo(name, shape, float32) for name, shape in outputs],
    )


def test_yolo_and_ssd_postprocess_heads_are_recognised() -> None:
    v8 = draft_manifest(_summary(("output0", (1, 84, 8400))))
    assert v8.family == "yolo" and v8.manifest["decoder"]["layout"] == "v8"
    assert len(v8.manifest["labels"]) == 80
    assert any("COCO" in line for line in v8.todo)
    v5 = draft_manifest(_summary(("output0", (1, 25200, 85))))
    assert v5.manifest["decoder"]["layout"] == "v5" and len(v5.manifest["labels"]) == 80
    ssd = draft_manifest(
        _summary(("boxes", (1, 10, 4)), ("classes", (1, 10)), ("scores", (1, 10)), ("n", (1,)))
    )
    assert ssd.family == "ssd_postprocess"
    assert ssd.manifest["decoder"]["boxes_output"] == 0
    assert ssd.manifest["decoder"]["count_output"] == 3
    for draft in (v8, v5, ssd):
        decode_manifest(json.dumps(draft.manifest))


def test_unknown_outputs_are_refused_naming_the_shapes() -> None:
    with pytest.raises(ModelError, match=r"no supported decoder .*'logits' \[1, 1000\]"):
        draft_manifest(_summary(("logits", (1, 1000))))


_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as in a controller-only install: the import fails
from controller.cli import main
main(sys.argv[2:])
"""


def _without(modules: str, *args: str) -> Any:
    import subprocess

    return subprocess.run(
        [sys.executable, "-c", _WITHOUT, modules, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("missing", "command"),
    [
        ("cv2", ["model", "package", "--golden", "tests/data/astronaut.png"]),
        (
            "ai_edge_litert,ai_edge_litert.interpreter",
            ["model", "package", "--golden", "tests/data/astronaut.png"],
        ),
        ("cv2", ["model", "quantize", "--calibration", "tests/data"]),
        ("numpy", ["model", "init"]),
    ],
)
def test_a_missing_inference_runtime_is_one_line_naming_the_extra(
    tmp_path: Path, missing: str, command: list[str]
) -> None:
    root = Path(__file__).resolve().parent.parent
    name, *options = command[1:]
    src = ASSETS_DIR / (
        "blazeface-short-int8.tflite" if name == "init" else "blazeface-short-fp16.json"
    )
    args = [
        "model",
        name,
        str(src),
        *[o if not o.startswith("tests/") else str(root / o) for o in options],
    ]
    if name == "package":
        args += ["--name", "x", "--version", "1", "--out", str(tmp_path / "x.efb")]
    elif name == "quantize":
        args += ["--out", str(tmp_path / "q")]
    else:
        args += ["--out", str(tmp_path / "x.json")]
    proc = _without(missing, *args)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "pip install 'edgefleet[inference]'" in proc.stderr


def test_readme_says_which_extra_runs_models_on_the_controller() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if "--golden" in line and "inference]" in line]
    assert lines, "README.md should say that `model package --golden` needs [inference]"
