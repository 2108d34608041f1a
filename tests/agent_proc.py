"""Run the real agent daemon as a subprocess with a generated config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.waiting import stop_process

REPO = Path(__file__).resolve().parent.parent
VIDEO = REPO / "inference" / "assets" / "face-walk-640x480.mp4"


def write_config(
    tmp: Path,
    *,
    port: int,
    device_id: str = "cam-01",
    streams: str | None = None,
    extra: str = "",
    telemetry_s: float = 1.0,
) -> Path:
    if streams is None:
        streams = stream_block("front", source=str(VIDEO), realtime=False, loop=False)
    text = (
        f'device_id = "{device_id}"\n'
        f'state_dir = "{tmp / "state"}"\n'
        f"{extra}\n"
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n\n'
        f"[telemetry]\ninterval_s = {telemetry_s}\n\n"
        f"{streams}"
    )
    path = tmp / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def stream_block(
    name: str,
    *,
    source: str,
    model: str = "builtin:blazeface-short-int8",
    realtime: bool = True,
    loop: bool = True,
    extra: str = "",
) -> str:
    return (
        f'[[streams]]\nname = "{name}"\nsource = "{source}"\nmodel = "{model}"\n'
        f"realtime = {str(realtime).lower()}\nloop = {str(loop).lower()}\n"
        f"reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n{extra}\n"
    )


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def start_agent(
    config: Path, log: Path, *, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the daemon; ``env`` adds variables (e.g. the EDGEFLEET_OTA_FAULT test hook)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with log.open("ab") as out:
        return subprocess.Popen(
            agent_command("run", "--config", str(config)),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def stop_agent(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> tuple[int, float]:
    """SIGTERM; return (exit code, seconds it took)."""
    started = time.monotonic()
    if not stop_process(proc, timeout=timeout):
        raise AssertionError(f"the agent did not stop within {timeout}s of SIGTERM (killed)")
    return proc.returncode, time.monotonic() - started
