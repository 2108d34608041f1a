"""The agent daemon under production settings: systemd notify/watchdog, Home Assistant
discovery, the drift KPI and a clean shutdown's sequence state, in one real run."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import Telemetry, decode
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto, free_port
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(0.2)
        yield path, sock


def _datagrams(sock: socket.socket, until: str, timeout: float = 30.0) -> list[str]:
    """What arrives on ``sock`` (0.2 s receive timeout) up to the first datagram with ``until``."""
    got: list[str] = []

    def arrived() -> bool:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            return False
        return any(until in g for g in got)

    wait_for(arrived, timeout=timeout, interval=0, what=lambda: f"{until!r}; got {got}")
    return got


def test_agent_under_systemd_with_home_assistant_and_drift(
    mosquitto: Mosquitto, tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    address, sock = notify_socket
    metrics_port = free_port()
    streams = stream_block("front", source=str(VIDEO), realtime=True, loop=True) + stream_block(
        "porch", source="rtsp://127.0.0.1:9/nothing-here"
    )
    config = write_config(
        tmp_path,
        port=mosquitto.port,
        streams=streams,
        telemetry_s=0.5,
        extra=(
            f"[metrics]\nenabled = true\nport = {metrics_port}\n"
            "[homeassistant]\nenabled = true\n"
            "[drift]\nbaseline_size = 10\nwindow = 10\n"
        ),
    )
    sub = Subscriber(
        mosquitto.port,
        ["homeassistant/#", "edgefleet/v1/cam-01/telemetry", "edgefleet/v1/cam-01/detections/+"],
    )
    proc = start_agent(
        config, tmp_path / "agent.log", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    )
    log = tmp_path / "agent.log"
    try:
        # READY=1 once the good stream inferred a frame and the unreachable camera was reported.
        ready = _datagrams(sock, "READY=1")
        ready_msg = next(g for g in ready if "READY=1" in g)
        assert "STATUS=1 of 2 streams running; failed: porch" in ready_msg, ready
        # WATCHDOG=1 keeps coming (every 0.5 s) while the stream makes progress.
        pings = _datagrams(sock, "WATCHDOG=1", timeout=5)
        pings += _datagrams(sock, "WATCHDOG=1", timeout=5)
        assert sum(g == "WATCHDOG=1" for g in pings) >= 2

        # Home Assistant discovery: retained configs for both streams, on the device's node id.
        msgs = sub.wait_for(
            lambda ms: sum(m.topic.startswith("homeassistant/") for m in ms) >= 4, timeout=20
        )
        discovery = {
            m.topic: json.loads(m.payload) for m in msgs if m.topic.startswith("homeassistant/")
        }
        assert set(discovery) == {
            "homeassistant/sensor/cam-01/front_count/config",
            "homeassistant/binary_sensor/cam-01/front_detected/config",
            "homeassistant/sensor/cam-01/porch_count/config",
            "homeassistant/binary_sensor/cam-01/porch_detected/config",
        }
        late = Subscriber(mosquitto.port, ["homeassistant/#"])  # Home Assistant restarting
        try:
            retained = late.wait_for(lambda ms: len(ms) >= 4, timeout=10)
        finally:
            late.close()
        assert {m.topic for m in retained} == set(discovery) and all(m.retain for m in retained)
        count = discovery["homeassistant/sensor/cam-01/front_count/config"]
        assert count["state_topic"] == "edgefleet/v1/cam-01/detections/front"

        # Drift KPI: once the baseline and the window are full, PSI is in telemetry ...
        def psi_reported(ms: list) -> bool:  # type: ignore[type-arg]
            for m in ms:
                if m.topic.endswith("/telemetry"):
                    t = decode(m.payload, Telemetry)
                    if any(s.name == "front" and s.score_psi is not None for s in t.streams):
                        return True
            return False

        msgs = sub.wait_for(psi_reported, timeout=30)
        psis = [
            s.score_psi
            for m in msgs
            if m.topic.endswith("/telemetry")
            for s in decode(m.payload, Telemetry).streams
            if s.name == "front" and s.score_psi is not None
        ]
        assert all(0 <= p < 20 for p in psis)
        # ... and in /metrics.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(r'edgefleet_stream_score_psi\{stream="front"\} \d', text), text[-3000:]
        assert (tmp_path / "state" / "drift" / "front.json").is_file()

        code, _ = stop_agent(proc)
        assert code == 0, log.read_text()[-3000:]
        assert "STOPPING=1" in _datagrams(sock, "STOPPING=1", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    sub.close()
    # A clean stop records the exact next sequence number: the next start has no gap.
    seqs = [json.loads(m.payload)["seq"] for m in sub.messages if "/detections/" in m.topic]
    lease_end = json.loads((tmp_path / "state" / "seq.json").read_text())["lease_end"]
    assert max(seqs) < lease_end < seqs[0] + 1000, (seqs[0], max(seqs), lease_end)
