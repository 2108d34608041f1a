"""A protocol-level device simulator: real protocol messages over real MQTT, no camera or model.

Each ``SimulatedDevice`` has its own MQTT v5 connection with the agent's contract: a
retained ``online`` status with an ``offline`` status as last will, a retained reported
state, telemetry every ``telemetry_interval_s``, events on demand. Killing the process
(SIGKILL) makes the broker publish the will, like a device losing power.

``publish_load`` pushes pre-encoded telemetry of many device ids through a few
connections as fast as possible (or at a rate) for load tests and benchmarks.

Command line::

    python -m controller.simulator --broker mqtt://127.0.0.1:1883 --devices 3 --prefix sim
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from protocol import (
    Event,
    Reported,
    Status,
    StreamReport,
    StreamStatus,
    StreamTelemetry,
    Telemetry,
    encode,
    events_topic,
    reported_topic,
    status_topic,
    telemetry_topic,
)

log = logging.getLogger(__name__)

AGENT_VERSION = "sim-0.1.0"
DEFAULT_MODEL = "blazeface-short-int8@1"


def status_message(
    device_id: str,
    *,
    state: str,
    ts: float,
    started_at: float,
    streams: Sequence[str] = ("cam0",),
    model: str | None = DEFAULT_MODEL,
    agent_version: str = AGENT_VERSION,
) -> Status:
    return Status(
        schema=1,
        device_id=device_id,
        state=state,  # type: ignore[arg-type]
        ts=ts,
        agent_version=agent_version,
        started_at=started_at,
        streams=[
            StreamStatus(
                name=s,
                source_state="running" if state == "online" else "stopped",
                model=model,
            )
            for s in streams
        ],
    )


def reported_message(
    device_id: str,
    *,
    ts: float,
    streams: Sequence[str] = ("cam0",),
    model: str | None = DEFAULT_MODEL,
    previous: str | None = None,
    desired_rev: int | None = None,
) -> Reported:
    return Reported(
        schema=1,
        device_id=device_id,
        ts=ts,
        desired_rev=desired_rev,
        streams={
            s: StreamReport(
                active=model,
                previous=previous,
                installed=[m for m in (model, previous) if m],
                phase="idle",
            )
            for s in streams
        },
    )


def telemetry_message(
    device_id: str,
    *,
    ts: float,
    rng: random.Random,
    streams: Sequence[str] = ("cam0",),
    interval_s: float = 10.0,
) -> Telemetry:
    return Telemetry(
        schema=1,
        device_id=device_id,
        ts=ts,
        interval_s=interval_s,
        cpu_percent=round(rng.uniform(5, 90), 1),
        mem_percent=round(rng.uniform(20, 70), 1),
        mem_used_bytes=rng.randrange(200, 900) * 1024 * 1024,
        temp_c=round(rng.uniform(40, 75), 1),
        disk_percent=round(rng.uniform(10, 60), 1),
        disk_free_bytes=rng.randrange(1, 30) * 1024**3,
        spool_depth=0,
        spool_dropped=0,
        streams=[
            StreamTelemetry(
                name=s,
                source_state="running",
                fps=round(rng.uniform(10, 30), 2),
                frames_captured=rng.randrange(100, 1000),
                frames_processed=rng.randrange(100, 1000),
                frames_dropped=rng.randrange(0, 20),
                infer_ms_p50=round(rng.uniform(0.5, 2), 3),
                infer_ms_p95=round(rng.uniform(2, 5), 3),
                latency_ms_p50=round(rng.uniform(5, 20), 3),
                latency_ms_p95=round(rng.uniform(20, 60), 3),
            )
            for s in streams
        ],
    )


def event_message(
    device_id: str, *, ts: float, code: str, level: str = "info", message: str = ""
) -> Event:
    return Event(
        schema=1,
        device_id=device_id,
        ts=ts,
        code=code,
        level=level,  # type: ignore[arg-type]
        message=message or code,
    )


def _client(client_id: str, username: str | None, password: str | None) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    return client


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


class SimulatedDevice:
    """One simulated device with its own MQTT connection and last will."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        username: str | None = None,
        password: str | None = None,
        streams: Sequence[str] = ("cam0",),
        model: str | None = DEFAULT_MODEL,
        telemetry_interval_s: float = 10.0,
        keepalive_s: int = 10,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.device_id = device_id
        self.broker_url = broker_url
        self.streams = tuple(streams)
        self.model = model
        self.telemetry_interval_s = telemetry_interval_s
        self.keepalive_s = keepalive_s
        self.clock = clock
        self.rng = random.Random(seed)
        self.started_at = clock()
        self.sent = 0
        self._connected = threading.Event()
        self._client = _client(f"sim-{device_id}", username, password)
        self._client.on_connect = self._on_connect
        will = status_message(
            device_id,
            state="offline",
            ts=self.started_at,
            started_at=self.started_at,
            streams=self.streams,
            model=model,
        )
        self._client.will_set(status_topic(device_id), encode(will), qos=1, retain=True)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def connect(self, timeout: float = 10.0) -> None:
        host, port = _host_port(self.broker_url)
        self._client.connect(host, port, keepalive=self.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self._client.loop_stop()
            raise TimeoutError(f"{self.device_id}: no CONNACK from {self.broker_url}")

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(timeout=10)
        self.sent += 1

    def publish_status(self, state: str = "online") -> None:
        msg = status_message(
            self.device_id,
            state=state,
            ts=self.clock(),
            started_at=self.started_at,
            streams=self.streams,
            model=self.model,
        )
        self._publish(status_topic(self.device_id), encode(msg), retain=True)

    def publish_reported(self, *, desired_rev: int | None = None) -> None:
        msg = reported_message(
            self.device_id,
            ts=self.clock(),
            streams=self.streams,
            model=self.model,
            desired_rev=desired_rev,
        )
        self._publish(reported_topic(self.device_id), encode(msg), retain=True)

    def publish_telemetry(self, *, wait: bool = True) -> None:
        msg = telemetry_message(
            self.device_id,
            ts=self.clock(),
            rng=self.rng,
            streams=self.streams,
            interval_s=self.telemetry_interval_s,
        )
        self._publish(telemetry_topic(self.device_id), encode(msg), wait=wait)

    def publish_event(self, code: str, *, level: str = "info", message: str = "") -> None:
        msg = event_message(
            self.device_id, ts=self.clock(), code=code, level=level, message=message
        )
        self._publish(events_topic(self.device_id), encode(msg))

    def announce(self) -> None:
        """What an agent does after connecting: online status, reported state, first telemetry."""
        self.publish_status("online")
        self.publish_reported()
        self.publish_telemetry()

    def stop(self, *, graceful: bool = True) -> None:
        """Graceful: publish ``offline`` and disconnect (no will); else just drop the socket."""
        if graceful and self._connected.is_set():
            self.publish_status("offline")
            self._client.disconnect()
        self._client.loop_stop()


# --- load generation --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadResult:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def telemetry_payloads(
    device_ids: Sequence[str], *, per_device: int, seed: int = 1, ts0: float | None = None
) -> list[tuple[str, bytes]]:
    """Pre-encoded telemetry, round-robin over the devices (so batches mix devices)."""
    rng = random.Random(seed)
    start = time.time() if ts0 is None else ts0
    templates = {d: telemetry_message(d, ts=start, rng=rng) for d in device_ids}
    out: list[tuple[str, bytes]] = []
    topics = {d: telemetry_topic(d) for d in device_ids}
    import msgspec

    for i in range(per_device):
        for d in device_ids:
            msg = msgspec.structs.replace(templates[d], ts=start + i)
            out.append((topics[d], encode(msg)))
    return out


def publish_load(
    *,
    broker_url: str,
    payloads: Iterable[tuple[str, bytes]],
    username: str | None = None,
    password: str | None = None,
    qos: int = 1,
    rate: float | None = None,
    client_id: str = "sim-load",
) -> LoadResult:
    """Publish ``payloads`` on one connection, at ``rate`` messages/s or as fast as possible.

    The network loop runs on this thread (``loop_write`` between publishes) so the queue
    of unsent messages stays small.
    """
    from paho.mqtt.enums import MQTTErrorCode

    client = _client(client_id, username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(10_000)
    host, port = _host_port(broker_url)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    sent = 0
    t0 = time.monotonic()
    last: Any = None
    try:
        for topic, payload in payloads:
            if rate is not None:
                due = t0 + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            while True:
                last = client.publish(topic, payload, qos=qos)
                if last.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                    break
                time.sleep(0.001)
            sent += 1
        if last is not None and qos > 0:
            last.wait_for_publish(timeout=60)
    finally:
        seconds = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
    return LoadResult(sent=sent, seconds=seconds)


# --- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.simulator",
        description="Simulated edgefleet devices speaking the MQTT protocol (no camera, no model).",
    )
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--devices", type=int, default=1, help="number of devices")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-0001, ...")
    parser.add_argument("--streams", default="cam0", help="comma-separated stream names")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="active model name@version")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--count", type=int, default=0, help="telemetry messages per device, then exit (0 = run)"
    )
    parser.add_argument("--event", action="append", default=[], help="publish this event code")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    devices = [
        SimulatedDevice(
            device_id=f"{args.prefix}-{i:04d}",
            broker_url=args.broker,
            username=args.username,
            password=args.password,
            streams=[s for s in args.streams.split(",") if s],
            model=args.model,
            telemetry_interval_s=args.telemetry_interval,
            seed=i,
        )
        for i in range(1, args.devices + 1)
    ]
    for dev in devices:
        dev.connect()
        dev.announce()
        for code in args.event:
            dev.publish_event(code, message=f"simulated {code}")
    print(f"ready: {len(devices)} devices on {args.broker}", flush=True)
    sent = 1
    try:
        while not stop.wait(args.telemetry_interval):
            if args.count and sent >= args.count:
                break
            for dev in devices:
                dev.publish_telemetry(wait=False)
            sent += 1
    finally:
        for dev in devices:
            dev.stop(graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
