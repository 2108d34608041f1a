"""Offline batch inference (`edgefleet-agent infer`) over images, folders and videos."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests import images
from tests.agent_proc import REPO, VIDEO, agent_command


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name, rel in (
        ("astronaut", "astronaut.png"),
        ("coffee", "sub/coffee.jpg"),
        ("rocket", "rocket.jpg"),
    ):
        rgb = images.image(name)
        cv2.imwrite(str(folder / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    return folder


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_command("infer", *args), cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_infer_folder_writes_one_line_per_image(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = _run("--model", "builtin:blazeface-short-int8", str(image_folder), "--jsonl", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {Path(r["source"]).name: r for r in lines}
    assert set(by_name) == {"astronaut.png", "coffee.jpg", "rocket.jpg", "broken.jpg"}
    astro = by_name["astronaut.png"]
    assert len(astro["detections"]) == 1 and astro["detections"][0]["score"] >= 0.75
    x0, y0, x1, y1 = astro["detections"][0]["box"]
    assert 0.3 < x0 < x1 < 0.6 and 0.1 < y0 < y1 < 0.4
    assert by_name["coffee.jpg"]["detections"] == [] and by_name["rocket.jpg"]["detections"] == []
    assert by_name["broken.jpg"]["error"] == "cannot decode image"
    assert "4 frames" in result.stderr and "1 unreadable" in result.stderr


def test_infer_video_and_image_in_one_run(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = _run(
        "--model",
        "builtin:blazeface-short-fp16",
        str(VIDEO),
        str(image_folder / "astronaut.png"),
        "--jsonl",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    video = [r for r in lines if r["source"].endswith(".mp4")]
    assert [r["frame"] for r in video] == list(range(150))
    assert all(r["model"] == "blazeface-short-fp16@1.0.0" for r in lines)
    faces = {r["frame"] for r in video if r["detections"]}
    assert faces == set(range(30)) | set(range(60, 90)) | set(range(120, 150))
    assert lines[-1]["source"].endswith("astronaut.png") and lines[-1]["detections"]


def test_infer_rejects_missing_source_and_unknown_files(tmp_path: Path) -> None:
    result = _run("--model", "builtin:blazeface-short-int8", str(tmp_path / "nope"), "--jsonl", "-")
    assert result.returncode == 2 and "does not exist" in result.stderr
    (tmp_path / "a.txt").write_text("x")
    result = _run(
        "--model", "builtin:blazeface-short-int8", str(tmp_path / "a.txt"), "--jsonl", "-"
    )
    assert result.returncode == 2 and "neither an image nor a video" in result.stderr


def test_infer_to_stdout(image_folder: Path) -> None:
    result = _run(
        "--model",
        "builtin:blazeface-short-onnx",
        str(image_folder / "astronaut.png"),
        "--jsonl",
        "-",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip())
    assert record["detections"][0]["label"] == "face"
    assert np.isclose(record["detections"][0]["score"], 0.92, atol=0.05)
