"""The simulator at fleet scale (tools/simulator): many devices over shared connections, and
bundle downloads that run concurrently (a real fleet downloads at once; the simulator used
to download one bundle after another, which made a 10,000-device benchmark measure it)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controller.broker import free_port
from protocol import Desired, ModelRef, desired_topic, encode
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for
from tools.simulator.fleet import FleetSummary, SimulatedFleet
from tools.simulator.fleet_procs import FleetProcesses, SimulatorError
from tools.simulator.mqtt import connect, mqtt_client
from tools.simulator.ota import OtaBehaviour

REPO = Path(__file__).resolve().parent.parent
BODY = b"bundle" * 1000
DELAY_S = 0.5


class _SlowBundles(BaseHTTPRequestHandler):
    active = 0
    peak = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        time.sleep(DELAY_S)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
        with cls.lock:
            cls.active -= 1

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def bundles() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowBundles)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/b.efb"
    finally:
        server.shutdown()


@contextlib.contextmanager
def _operator(broker_url: str, bundle_url: str) -> Iterator[Callable[[list[str]], None]]:
    """A connected MQTT client; yields a function that sets every given device's retained
    desired state to m@2 (the bundle at ``bundle_url``)."""
    ref = ModelRef(
        name="m", version="2", url=bundle_url, sha256=hashlib.sha256(BODY).hexdigest(),
        size=len(BODY),
    )  # fmt: skip
    client = mqtt_client(f"test-desired-{time.monotonic_ns()}", None, None)
    connect(client, broker_url, keepalive=30)
    client.loop_start()

    def send(ids: list[str]) -> None:
        for d in ids:
            desired = Desired(schema=1, rev=1, models={"cam0": ref})
            client.publish(desired_topic(d), encode(desired), qos=1, retain=True)

    try:
        yield send
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_fleet_downloads_concurrently(mosquitto: Mosquitto, bundles: str) -> None:
    ids = [f"dl-{i:02d}" for i in range(40)]
    fleet = SimulatedFleet(
        broker_url=mosquitto.url,
        device_ids=ids,
        behaviour=OtaBehaviour(download=True, phase_delay_s=0.01),
        per_connection=20,
        download_workers=64,
    )
    with _operator(mosquitto.url, bundles) as send:
        try:
            fleet.connect()
            t0 = time.monotonic()
            send(ids)

            def done() -> bool:
                return all(o.streams["cam0"]["active"] == "m@2" for o in fleet.devices.values())

            wait_for(done, timeout=15, what="every device to download and commit m@2")
            took = time.monotonic() - t0
        finally:
            fleet.stop()
    # One after another: 40 x 0.5 s = 20 s. Concurrent: about one delay.
    assert _SlowBundles.peak >= 20, _SlowBundles.peak
    assert took < 10 * DELAY_S, f"{took:.1f}s"


def test_the_command_line_runs_thousands_of_devices_over_shared_connections(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "broker", extra_config="max_queued_messages 100000\n")
    broker.start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tools.simulator", "--broker", broker.url, "--devices", "2000",
             "--per-connection", "250", "--count", "1", "--prefix", "cli"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert "ready: 2000 devices" in out.stdout
        sub = Subscriber(broker.port, ["edgefleet/v1/+/reported"], persistent=False)
        try:
            sub.wait_for(lambda ms: len(ms) >= 2000, timeout=30)
            assert {m.topic.split("/")[2] for m in sub.messages} == {
                f"cli-{i:04d}" for i in range(1, 2001)
            }
        finally:
            sub.close()
    finally:
        broker.stop()


def test_a_fleet_split_over_processes_acts_as_one(mosquitto: Mosquitto, bundles: str) -> None:
    """Three child processes (one interpreter lock each) share 30 devices; every device
    downloads and commits, each on one rev, and the parent sums what they ended with."""
    ids = [f"px-{i:02d}" for i in range(30)]
    fleet = FleetProcesses(
        processes=3,
        broker_url=mosquitto.url,
        device_ids=ids,
        behaviour=OtaBehaviour(download=True, phase_delay_s=0.01),
        per_connection=5,
        telemetry_interval_s=0.5,
    )
    sub = Subscriber(mosquitto.port, ["edgefleet/v1/+/telemetry"], persistent=False)
    with _operator(mosquitto.url, bundles) as send:
        try:
            assert len(set(fleet.pids)) == 3 and os.getpid() not in fleet.pids
            fleet.connect()
            fleet.announce()
            fleet.start_telemetry(0.5)
            send(ids)
            wait_for(lambda: fleet.summary("m@2").on_model == 30, timeout=20, what="30 on m@2")
            assert fleet.summary("m@2") == FleetSummary(devices=30, on_model=30, one_rev=30)
            assert fleet.summary("other@1") == FleetSummary(devices=30, on_model=0, one_rev=0)
            # Every child publishes its own devices' telemetry on its own loop.
            sub.wait_for(lambda ms: {m.topic.split("/")[2] for m in ms} == set(ids), timeout=10)
        finally:
            fleet.stop()
            sub.close()
    assert all(not p.is_alive() for p in fleet._procs)


def test_a_child_that_fails_a_command_is_reported_with_its_error(tmp_path: Path) -> None:
    closed = free_port()
    fleet = FleetProcesses(
        processes=2,
        broker_url=f"mqtt://127.0.0.1:{closed}",
        device_ids=["a", "b", "c"],
        behaviour=OtaBehaviour(),
    )
    try:
        with pytest.raises(SimulatorError, match="process 0 failed connect: ConnectionRefused"):
            fleet.connect(timeout=5)
        with pytest.raises(SimulatorError, match="at least 1"):
            FleetProcesses(
                processes=0, broker_url="mqtt://x", device_ids=[], behaviour=OtaBehaviour()
            )
    finally:
        fleet.stop()
