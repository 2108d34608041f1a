"""SIGTERM at random moments to real agents reading a real RTSP stream: always exit 0.

Outside testers saw ``terminate called without an active exception`` (SIGABRT, exit 134)
when the agent was stopped while its RTSP source reconnected: the interpreter finalized
while a capture thread was still inside OpenCV/FFmpeg. Here five agents run side by side,
each on its own GStreamer RTSP server (tests/rtsp_server.py, the shipped video) and state
dir, against one real Mosquitto; each gets ten SIGTERMs over ten runs, at a random moment
of one of the phases: starting, running, its server just gone (reconnecting, refused), its
server coming back (reconnecting, opening), its server hung (a camera that stops answering:
the capture thread sits in FFmpeg until the read timeout). The hung phase sends the SIGTERM
shortly before that timeout, so the read returns while the agent finishes its shutdown: the
moment that aborted the process.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.capture import READ_TIMEOUT_S
from protocol import Status, decode
from tests.agent_proc import REPO, VIDEO, start_agent, stream_block, write_config
from tests.broker import Mosquitto, free_port
from tests.mqtt_sub import Subscriber
from tests.waiting import stop_process, wait_for

pytestmark = pytest.mark.slow

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = REPO / "tests" / "rtsp_server.py"
PHASES = ("starting", "running", "server_gone", "server_back", "server_hung")
SLOTS = 5
ROUNDS = 10
SIGTERM_BIT = 1 << (15 - 1)
"""SIGTERM in /proc/PID/status ``SigCgt`` (bit signum - 1)."""


class RtspServer:
    """``tests/rtsp_server.py`` as a process on a fixed loopback port; stop and start again."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/stream"
        self._log = workdir / f"rtsp-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not Path(SYSTEM_PYTHON).exists():
            pytest.fail(f"{SYSTEM_PYTHON} is missing: the RTSP test server needs Debian's python3")
        with self._log.open("ab") as out:
            self.proc = proc = subprocess.Popen(
                [SYSTEM_PYTHON, str(SERVER), "--port", str(self.port), "--video", str(VIDEO)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(
                    f"the RTSP test server exited with {proc.returncode}; it cannot serve the "
                    f"video: {self._log.read_text(errors='replace')[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(listening, timeout=15, what=f"the RTSP server to listen on {self.port}")

    def hang(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing more is sent."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc, timeout=5)
            self.proc = None


def test_rtsp_server_serves_the_shipped_video(tmp_path: Path) -> None:
    """The test server itself: OpenCV/FFmpeg (what the agent uses) reads frames from it."""
    import cv2

    server = RtspServer(tmp_path)
    server.start()
    try:
        cap = cv2.VideoCapture(server.url, cv2.CAP_FFMPEG)
        try:
            assert cap.isOpened(), "OpenCV cannot open the test RTSP stream"
            shapes = [img.shape for ok, img in (cap.read() for _ in range(5)) if ok]
        finally:
            cap.release()
        assert shapes == [(480, 640, 3)] * 5
    finally:
        server.stop()


@dataclass
class Outcome:
    device_id: str
    phase: str
    delay_s: float
    code: int | None
    log: Path


def _handles_sigterm(proc: subprocess.Popen[bytes]) -> bool:
    """True once ``proc`` installed a SIGTERM handler (before that the default action kills)."""
    if proc.poll() is not None:
        raise AssertionError(f"the agent exited with {proc.returncode} before the SIGTERM")
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & SIGTERM_BIT)


class Watcher:
    """The latest retained status per device, from one subscription for every agent."""

    def __init__(self, port: int) -> None:
        self._sub = Subscriber(port, ["edgefleet/v1/+/status"], persistent=False)

    def source_state(self, device_id: str) -> str | None:
        for m in reversed(self._sub.on(f"/{device_id}/status")):
            status = decode(m.payload, Status)
            return status.streams[0].source_state if status.streams else None
        return None

    def until(self, device_id: str, state: str, proc: subprocess.Popen[bytes]) -> None:
        def reached() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{device_id} exited with {proc.returncode}")
            return self.source_state(device_id) == state

        wait_for(reached, timeout=20, what=f"{device_id}'s source to be {state}")

    def close(self) -> None:
        self._sub.close()


def _round(
    tmp: Path,
    broker: Mosquitto,
    server: RtspServer,
    watcher: Watcher,
    device_id: str,
    phase: str,
    rng: random.Random,
) -> Outcome:
    workdir = tmp / device_id
    workdir.mkdir()
    streams = stream_block("cam", source=server.url, extra="fps = 5")
    config = write_config(workdir, port=broker.port, device_id=device_id, streams=streams)
    log = workdir / "agent.log"
    if server.proc is None:
        server.start()
    proc = start_agent(config, log)
    delay = 0.0
    try:
        if phase == "starting":
            wait_for(lambda: _handles_sigterm(proc), timeout=20, what="a SIGTERM handler")
            delay = rng.uniform(0.0, 1.5)
        else:
            watcher.until(device_id, "running", proc)
            if phase == "running":
                delay = rng.uniform(0.0, 2.0)
            elif phase == "server_gone":
                server.stop()
                watcher.until(device_id, "reconnecting", proc)
                delay = rng.uniform(0.0, 2.0)
            elif phase == "server_hung":
                server.hang()
                delay = rng.uniform(READ_TIMEOUT_S - 1.7, READ_TIMEOUT_S - 1.0)
            else:
                server.stop()
                watcher.until(device_id, "reconnecting", proc)
                server.start()
                delay = rng.uniform(0.0, 1.0)
        threading.Event().wait(delay)
        stop_process(proc, timeout=15)
    finally:
        if phase == "server_hung":
            server.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Outcome(device_id, phase, round(delay, 2), proc.returncode, log)


def _slot(tmp: Path, broker: Mosquitto, watcher: Watcher, slot: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed + slot)
    server = RtspServer(tmp)
    outcomes: list[Outcome] = []
    try:
        for n in range(ROUNDS):
            phase = PHASES[(slot + n) % len(PHASES)]
            outcomes.append(_round(tmp, broker, server, watcher, f"stop-{slot}-{n}", phase, rng))
    finally:
        server.stop()
    return outcomes


def _describe(bad: list[Outcome]) -> str:
    def tail(path: Path) -> str:
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    return "\n".join(
        f"{o.device_id} ({o.phase}, SIGTERM after {o.delay_s} s): exit {o.code}\n{tail(o.log)}"
        for o in bad[:3]
    )


def test_sigterm_at_random_moments_always_exits_0(mosquitto: Mosquitto, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    watcher = Watcher(mosquitto.port)
    run: Callable[[int], list[Outcome]] = lambda slot: _slot(  # noqa: E731
        tmp_path, mosquitto, watcher, slot, seed
    )
    try:
        with ThreadPoolExecutor(SLOTS) as pool:
            outcomes = [o for batch in pool.map(run, range(SLOTS)) for o in batch]
    finally:
        watcher.close()
    assert len(outcomes) == SLOTS * ROUNDS
    assert {o.phase for o in outcomes} == set(PHASES)
    bad = [o for o in outcomes if o.code != 0]
    assert not bad, (
        f"seed {seed}: {len(bad)} of {len(outcomes)} SIGTERMs did not end in exit 0 "
        f"({sorted({o.code for o in bad}, key=str)}):\n{_describe(bad)}"
    )
