"""The agent's exit status as systemd's ``Restart=on-failure`` reads it (real processes).

Outside testers saw ``run`` exit 0 when every stream had failed for good, so systemd never
restarted it. Now: 3 when the agent stops on its own because no stream can deliver frames
and one of them failed; 0 when every file source simply ended (``loop = false``) and on
SIGTERM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.app import EXIT_STREAMS_FAILED
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def _run_to_end(config: Path, log: Path) -> int:
    proc = start_agent(config, log)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _broken_video(tmp_path: Path) -> Path:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 100)
    return broken


def test_every_stream_failed_exits_3(mosquitto: Mosquitto, tmp_path: Path) -> None:
    streams = stream_block("missing", source=str(tmp_path / "gone.mp4")) + stream_block(
        "broken", source=str(_broken_video(tmp_path))
    )
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    log = tmp_path / "agent.log"
    code = _run_to_end(config, log)
    text = log.read_text(errors="replace")
    assert code == EXIT_STREAMS_FAILED == 3, text[-3000:]
    assert "no stream can deliver frames; failed: " in text
    assert "missing: cannot open video file" in text and "broken: " in text
    assert "Traceback" not in text


def test_a_failed_stream_beside_an_ended_file_exits_3(mosquitto: Mosquitto, tmp_path: Path) -> None:
    streams = stream_block("done", source=str(VIDEO), realtime=False, loop=False) + stream_block(
        "missing", source=str(tmp_path / "gone.mp4")
    )
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    log = tmp_path / "agent.log"
    assert _run_to_end(config, log) == 3, log.read_text(errors="replace")[-3000:]


def test_files_that_ended_exit_0(mosquitto: Mosquitto, tmp_path: Path) -> None:
    streams = stream_block("a", source=str(VIDEO), realtime=False, loop=False) + stream_block(
        "b", source=str(VIDEO), realtime=False, loop=False
    )
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    log = tmp_path / "agent.log"
    assert _run_to_end(config, log) == 0, log.read_text(errors="replace")[-3000:]
    assert "every source ended; stopping" in log.read_text()


def test_sigterm_exits_0_while_every_stream_is_down(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A stopped agent is not a failed one, whatever its streams do: an unreachable camera
    (reconnecting) and a failed file."""
    streams = stream_block("cam", source="rtsp://127.0.0.1:9/none") + stream_block(
        "missing", source=str(tmp_path / "gone.mp4")
    )
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    log = tmp_path / "agent.log"
    proc = start_agent(config, log)
    try:
        wait_for(
            lambda: "stream cam: source reconnecting" in log.read_text(errors="replace"),
            timeout=30,
            what="the camera stream to be reconnecting",
        )
        code, _ = stop_agent(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text(errors="replace")[-3000:]
