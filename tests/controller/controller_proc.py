"""The controller as a real process (``python -m controller controller serve``) for tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.broker import Mosquitto, free_port
from tests.waiting import stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]


def wait_healthy(
    proc: subprocess.Popen[bytes], url: str, tail: Callable[[], str], timeout: float = 30
) -> None:
    """Wait until the controller ``proc`` at ``url`` answers /healthz with MQTT connected;
    fail at once, with ``tail()`` (its log), if it exits."""

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"controller exited with {proc.returncode}:\n{tail()}")
        try:
            return bool(httpx.get(f"{url}/healthz", timeout=1).json()["mqtt"] == "connected")
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=timeout, what="the controller to answer /healthz")


class ControllerProcess:
    """``python -m controller controller serve`` on a config; start, SIGKILL, start again."""

    def __init__(self, tmp_path: Path, db_url: str, broker: Mosquitto, *, extra: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "controller.toml"
        self.config.write_text(
            f'data_dir = "{tmp_path / "data"}"\n'
            f'[database]\nurl = "{db_url}"\n'
            f'[broker]\nurl = "{broker.url}"\nclient_id = "ctl-{self.port}"\n'
            "[ingest]\nflush_interval_s = 0.05\n"
            f"[api]\nport = {self.port}\n{extra}"
        )
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = tmp_path

    def start(self) -> None:
        log = self._tmp / f"controller-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controller",
                    "controller",
                    "serve",
                    "--config",
                    str(self.config),
                ],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_healthy(self.proc, self.url, self.tail)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM; it must exit cleanly (0) within 15 s, or have done so already."""
        if self.proc is None:
            return
        if not stop_process(self.proc, timeout=15):
            pytest.fail(f"controller did not stop on SIGTERM:\n{self.tail()}")
        assert self.proc.returncode == 0, self.tail()

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.logs
            if p.exists()
        )
