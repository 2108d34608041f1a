"""A real Mosquitto broker process for tests, on a free loopback port.

Each broker gets its own config file and persistence folder, so tests can stop it,
restart it on the same port (an outage) and keep persistent sessions across the restart.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from tests.waiting import stop_process, wait_for


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )
    if found is None:
        raise RuntimeError(
            "mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto"
        )
    return found


def wait_listening(proc: subprocess.Popen[bytes], port: int, *, timeout: float, log: Path) -> None:
    """Wait until the mosquitto ``proc`` accepts connections on ``port``.

    Fails at once (RuntimeError, with the end of its stderr and ``log``) if it exits; one that
    does not listen in time is killed before the AssertionError.
    """

    def listening() -> bool:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {err}{text[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_for(listening, timeout=timeout, what=f"mosquitto to listen on port {port}")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """Start/stop/restart a mosquitto on 127.0.0.1:``port`` with ``extra_config`` lines."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra_config: str = "") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        persistence = self.workdir / "persist"
        persistence.mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {persistence}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # As root, mosquitto would drop to the `mosquitto` user and could not write its
            # persistence file or log in the test folder.
            "user root" if os.geteuid() == 0 else "",
            self.extra_config,
        ]
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return conf

    def start(self, timeout: float = 10.0) -> None:
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.proc, self.port, timeout=timeout, log=self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
