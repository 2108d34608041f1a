"""Issue 11, "an operator's first hour": what a new operator met, each checked here.

- ``edgefleet-agent check-config`` said OK for a video file that does not exist; cameras
  that are missing now get a warning (one may be plugged in later), files an error. The
  run-time error said relative paths are resolved from the working directory: they are
  resolved from the config file's folder, and the error names the absolute path tried.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.app import EXIT_STREAMS_FAILED
from tests.agent_proc import REPO, VIDEO, agent_command, stream_block, write_config
from tests.broker import Mosquitto


def _check_config(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_command("check-config", str(config)),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def _config(folder: Path, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, port=1883, streams=stream_block("front", source=source))


# --- check-config and video sources -----------------------------------------------------


def test_check_config_refuses_a_video_file_that_does_not_exist(tmp_path: Path) -> None:
    config = _config(tmp_path / "conf", "clips/gone.mp4")
    result = _check_config(config, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    tried = tmp_path / "conf" / "clips" / "gone.mp4"
    assert f"stream 'front': video file {tried} does not exist" in result.stderr
    assert f"resolved from the config file's folder {tmp_path / 'conf'}" in result.stderr
    assert "OK" not in result.stdout


def test_check_config_accepts_a_relative_video_file_beside_the_config(tmp_path: Path) -> None:
    """Good input: the file is found from the config's folder, whatever the working dir."""
    (tmp_path / "conf" / "clips").mkdir(parents=True)
    (tmp_path / "conf" / "clips" / "walk.mp4").write_bytes(VIDEO.read_bytes())
    config = _config(tmp_path / "conf", "clips/walk.mp4")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _check_config(config, cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{config}: OK" in result.stdout and "warning" not in result.stderr + result.stdout


@pytest.mark.parametrize("camera", ["/dev/video97", "v4l2:97"])
def test_check_config_warns_about_a_missing_camera_and_accepts_it(
    tmp_path: Path, camera: str
) -> None:
    config = _config(tmp_path, camera)
    result = _check_config(config, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: stream 'front': camera /dev/video97 does not exist now" in result.stdout
    assert f"{config}: OK" in result.stdout


@pytest.mark.slow
def test_run_names_the_absolute_path_it_tried_and_exits_3(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The run-time error tells the truth about relative paths (config folder, not cwd)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    config = write_config(
        folder, port=mosquitto.port, streams=stream_block("front", source="clips/gone.mp4")
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        agent_command("run", "--config", str(config)),
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
    )
    out = result.stdout + result.stderr
    assert result.returncode == EXIT_STREAMS_FAILED, out[-3000:]
    assert f"cannot open video file {folder / 'clips' / 'gone.mp4'}: it does not exist" in out
    assert "resolved from the config file's folder" in out
    assert "working directory" not in out
