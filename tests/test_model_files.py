"""A model file stands for the manifest beside it: ``-m model.tflite`` / ``model = "x.onnx"``.

``edgefleet-agent infer -m blazeface-short-int8.tflite`` used to read the .tflite as JSON
("JSON is malformed: invalid character (byte 1)") although the manifest sat right beside it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from inference import ASSETS_DIR
from inference.detector import load_detector, read_manifest
from inference.errors import ModelError
from inference.models import manifest_for, resolve_model

INT8 = ASSETS_DIR / "blazeface-short-int8.tflite"
VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]


def _copy_model(folder: Path, *, manifest_name: str | None) -> Path:
    """The INT8 model as ``folder/model.tflite``; its manifest as ``manifest_name``."""
    model = folder / "model.tflite"
    shutil.copyfile(INT8, model)
    if manifest_name is not None:
        data = json.loads((ASSETS_DIR / "blazeface-short-int8.json").read_text())
        data["model"] = model.name
        data["files"][0]["path"] = model.name
        (folder / manifest_name).write_text(json.dumps(data), encoding="utf-8")
    return model


def test_agent_infer_takes_a_model_file_like_its_manifest(tmp_path: Path) -> None:
    """The CLI path of the finding: same detections as with the manifest."""
    outputs = {}
    for name, model in (("model", INT8), ("manifest", INT8.with_suffix(".json"))):
        out = tmp_path / f"{name}.jsonl"
        proc = subprocess.run(
            [*AGENT, "infer", "-m", str(model), str(VIDEO), "--jsonl", str(out), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "malformed" not in proc.stderr
        outputs[name] = [json.loads(line)["detections"] for line in out.read_text().splitlines()]
    assert outputs["model"] == outputs["manifest"]
    assert sum(1 for d in outputs["model"] if d) >= 80  # the face is found (90 frames have it)


def test_same_stem_manifest_is_used(tmp_path: Path) -> None:
    model = _copy_model(tmp_path, manifest_name="model.json")
    assert manifest_for(model) == tmp_path / "model.json"
    assert resolve_model("model.tflite", tmp_path) == tmp_path / "model.json"
    assert read_manifest(model).name == "blazeface-short-int8"
    with load_detector(model) as detector:
        assert detector.manifest_path == tmp_path / "model.json"
        assert detector.ref == "blazeface-short-int8@1.0.0"


def test_a_manifest_naming_the_file_is_found_when_the_stem_differs() -> None:
    """The shipped ONNX model's manifest is blazeface-short-onnx.json."""
    assert manifest_for(ASSETS_DIR / "blazeface-short.onnx") == (
        ASSETS_DIR / "blazeface-short-onnx.json"
    )


def test_manifest_paths_and_builtins_are_unchanged(tmp_path: Path) -> None:
    manifest = ASSETS_DIR / "blazeface-short-int8.json"
    assert manifest_for(manifest) == manifest
    assert resolve_model("builtin:blazeface-short-fp16", tmp_path).name == (
        "blazeface-short-fp16.json"
    )
    assert resolve_model("missing.json", tmp_path) == tmp_path / "missing.json"


def test_without_a_manifest_the_error_names_it_and_how_to_make_one(tmp_path: Path) -> None:
    model = _copy_model(tmp_path, manifest_name=None)
    with pytest.raises(ModelError) as info:
        load_detector(model)
    message = str(info.value)
    assert f"expected {tmp_path / 'model.json'} beside it" in message
    assert f"`edgefleet model init {model}`" in message
    assert "malformed" not in message


def test_agent_infer_without_a_manifest_says_what_is_missing(tmp_path: Path) -> None:
    model = _copy_model(tmp_path, manifest_name=None)
    proc = subprocess.run(
        [*AGENT, "infer", "-m", str(model), str(VIDEO), "--jsonl", "-", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert str(tmp_path / "model.json") in proc.stderr
    assert "edgefleet model init" in proc.stderr


def test_two_manifests_naming_the_file_are_ambiguous(tmp_path: Path) -> None:
    model = _copy_model(tmp_path, manifest_name="a.json")
    shutil.copyfile(tmp_path / "a.json", tmp_path / "b.json")
    with pytest.raises(ModelError, match=r"named by several manifests .*pass the manifest"):
        manifest_for(model)


def test_a_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model file .*nope\.onnx not found"):
        manifest_for(tmp_path / "nope.onnx")


def test_agent_config_stream_may_name_the_model_file(tmp_path: Path) -> None:
    _copy_model(tmp_path, manifest_name="model.json")
    config = tmp_path / "agent.toml"
    text = (
        'device_id = "cam-01"\nstate_dir = "state"\n\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n'
        '\n[[streams]]\nname = "front"\nsource = "video.mp4"\nmodel = "model.tflite"\n'
    )
    config.write_text(text, encoding="utf-8")
    loaded = load_config(config)
    assert loaded.config.streams[0].model == "model.tflite"
    (tmp_path / "model.json").unlink()
    with pytest.raises(ConfigError, match=r"model\.json beside it.*edgefleet model init"):
        load_config(config)
