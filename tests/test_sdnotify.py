"""sd_notify over a real AF_UNIX datagram socket, progress watchdog, readiness gate."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, ProgressWatchdog, ReadinessGate


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _receive(sock: socket.socket) -> str:
    sock.settimeout(5.0)
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield path, sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        yield f"@{name}", sock


def test_notifier_sends_ready_watchdog_stopping_to_a_path_socket(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert _receive(sock) == "READY=1"
    assert notifier.watchdog()
    assert _receive(sock) == "WATCHDOG=1"
    assert notifier.status("2 streams\nrunning")
    assert _receive(sock) == "STATUS=2 streams running"
    assert notifier.stopping()
    assert _receive(sock) == "STOPPING=1"


def test_notifier_sends_to_an_abstract_socket(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.ready(status="streams: front")
    assert _receive(sock) == "READY=1\nSTATUS=streams: front"
    assert notifier.watchdog()
    assert _receive(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert _receive(sock) == "STOPPING=1"


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.ready()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval_s == 15.0
    other_pid = {**env, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other_pid).watchdog_interval_s is None
    no_pid = {k: v for k, v in env.items() if k != "WATCHDOG_PID"}
    assert Notifier.from_env(no_pid).watchdog_interval_s == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


def test_progress_watchdog_pings_while_streams_progress_and_stops_when_one_stalls(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    clock = FakeClock()
    last = {"front": clock.now, "back": clock.now}
    dog = ProgressWatchdog(
        Notifier(address),
        interval_s=5.0,
        stall_s=10.0,
        progress=lambda: list(last.values()),
        clock=clock,
    )
    assert dog.tick()
    assert _receive(sock) == "WATCHDOG=1"

    clock.now += 8.0
    last["front"] = clock.now  # front keeps going, back's last inference is 8 s old
    assert dog.tick()
    assert _receive(sock) == "WATCHDOG=1"

    clock.now += 5.0  # back is now 13 s behind: stalled
    assert not dog.tick()
    assert dog.stalled
    assert _receive(sock).startswith("STATUS=stalled")
    assert not dog.tick()  # still stalled: nothing at all is sent
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)

    last["back"] = clock.now  # progress resumes
    assert dog.tick()
    assert not dog.stalled
    assert _receive(sock) == "WATCHDOG=1"
    assert dog.pings == 3


def test_progress_watchdog_treats_no_running_stream_as_healthy() -> None:
    dog = ProgressWatchdog(Notifier(None), interval_s=1.0, stall_s=1.0, progress=list)
    assert dog.healthy()


def test_progress_watchdog_withholds_ping_when_the_probe_raises() -> None:
    def broken() -> list[float]:
        raise RuntimeError("probe bug")

    dog = ProgressWatchdog(Notifier(None), interval_s=1.0, stall_s=1.0, progress=broken)
    assert not dog.tick()
    assert dog.stalled


def test_progress_watchdog_thread_stops_pinging_once_progress_stalls(
    path_socket: tuple[str, socket.socket],
) -> None:
    """The real thread: pings arrive while progressing; after the stall none do."""
    address, sock = path_socket
    clock = FakeClock()
    last = [clock.now]
    probed = threading.Event()
    stalled_seen = threading.Event()

    def progress() -> list[float]:
        probed.set()
        if clock.now - last[0] > 10.0:
            stalled_seen.set()
        return list(last)

    dog = ProgressWatchdog(
        Notifier(address), interval_s=0.01, stall_s=10.0, progress=progress, clock=clock
    )
    dog.start()
    try:
        assert _receive(sock) == "WATCHDOG=1"
        clock.now += 60.0  # the detector hangs: no new inference timestamp
        assert stalled_seen.wait(5.0)
        # Drain what was sent before the stall became visible; then only silence.
        sock.settimeout(0.5)
        messages = []
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any(m.startswith("STATUS=stalled") for m in messages)
        assert dog.stalled
        status_at = next(i for i, m in enumerate(messages) if m.startswith("STATUS=stalled"))
        assert all(m != "WATCHDOG=1" for m in messages[status_at:])
    finally:
        dog.stop()


def test_readiness_gate_fires_once_all_streams_processed_or_failed() -> None:
    calls: list[int] = []
    gate = ReadinessGate(["front", "back", "side"], lambda: calls.append(1))
    gate.first_frame("front")
    gate.first_frame("front")
    assert not gate.is_ready
    gate.stream_failed("back")
    assert gate.pending == {"side"}
    assert calls == []
    gate.first_frame("side")
    assert gate.is_ready
    assert calls == [1]
    assert gate.failed == ["back"]
    gate.first_frame("side")
    gate.stream_failed("front")
    assert calls == [1]


def test_readiness_gate_sends_ready_over_the_socket(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    notifier = Notifier(address)
    gate = ReadinessGate(["front"], notifier.ready)
    gate.first_frame("front")
    assert _receive(sock) == "READY=1"


def test_readiness_gate_without_streams_is_ready_at_once() -> None:
    calls: list[int] = []
    gate = ReadinessGate([], lambda: calls.append(1))
    assert gate.is_ready
    assert calls == [1]
