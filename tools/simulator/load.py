"""Load generation: pre-encoded telemetry of many device ids (:func:`telemetry_payloads`)
pushed through one connection as fast as possible or at a rate (:func:`publish_load`), for
load tests and benchmarks."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import encode, telemetry_topic
from tools.simulator.messages import telemetry_message
from tools.simulator.mqtt import connect, mqtt_client


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

    client = mqtt_client(client_id, username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(10_000)
    connect(client, broker_url, keepalive=30)
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
