"""What the controller's chunked socket reads (controller.mqtt_reads.ChunkedReadClient) save
against paho-mqtt's own client, in the same process, rounds interleaved.

Each round: a subscriber with a persistent session leaves, ``--messages`` telemetry-sized
messages (QoS 1, 1,000 device topics) are queued for it by a real Mosquitto, and the
subscriber (the client under test) reconnects and drains them, acknowledging each one as
paho does. Reported: the process's CPU per message (``/proc/self/task/*/schedstat``,
every thread; the publisher has finished before the clock starts) and the drain rate.

Run: ``.venv/bin/python -m bench.mqtt_reads`` (about a minute; ``--messages``, ``--rounds``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.procstat import process_cpu_s
from controller.mqtt_reads import ChunkedReadClient
from tests.broker import Mosquitto

PAYLOAD = (
    b'{"schema":1,"device_id":"dev-00001","ts":1765000000.0,"uptime_s":1234.5,'
    b'"cpu_percent":12.5,"mem_mb":91.2,"streams":{"cam0":{"fps":15.0,"infer_ms":2.1,'
    b'"dropped":0}}}'
)
TOPIC_FILTER = "edgefleet/v1/+/telemetry"


def _props() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    return props


def _client(cls: type[mqtt.Client], client_id: str) -> mqtt.Client:
    return cls(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )


def one_round(port: int, cls: type[mqtt.Client], client_id: str, n: int) -> tuple[float, float]:
    """(CPU microseconds per message, messages per second) draining ``n`` queued messages."""
    sub = _client(cls, client_id)
    sub.connect("127.0.0.1", port, clean_start=True, properties=_props())
    sub.loop_start()
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.subscribe(TOPIC_FILTER, qos=1)
    if not subscribed.wait(10):
        raise SystemExit("no SUBACK from the broker")
    sub.disconnect()
    sub.loop_stop()
    pub = _client(mqtt.Client, f"{client_id}-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [
        pub.publish(f"edgefleet/v1/dev-{i % 1000:05d}/telemetry", PAYLOAD, 1) for i in range(n)
    ]
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()
    got = [0]
    done = threading.Event()

    def on_message(_c: object, _u: object, _m: object) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    sub = _client(cls, client_id)
    sub.on_message = on_message
    cpu0, t0 = process_cpu_s(), time.monotonic()
    sub.connect("127.0.0.1", port, clean_start=False, properties=_props())
    sub.loop_start()
    finished = done.wait(120)
    cpu1, t1 = process_cpu_s(), time.monotonic()
    sub.disconnect()
    sub.loop_stop()
    if not finished:
        raise SystemExit(f"{cls.__name__} received {got[0]} of {n} messages in 120 s")
    return (cpu1 - cpu0) / n * 1e6, n / (t1 - t0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per client (interleaved)")
    args = parser.parse_args(argv)
    clients: dict[str, type[mqtt.Client]] = {"paho": mqtt.Client, "chunked": ChunkedReadClient}
    cpu: dict[str, list[float]] = {k: [] for k in clients}
    rate: dict[str, list[float]] = {k: [] for k in clients}
    config = "max_inflight_messages 100\nmax_queued_messages 1000000"
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "b", extra_config=config) as b:
        for r in range(args.rounds):
            for name in ("paho", "chunked") if r % 2 == 0 else ("chunked", "paho"):
                us, per_s = one_round(b.port, clients[name], f"{name}-{r}", args.messages)
                cpu[name].append(us)
                rate[name].append(per_s)
                print(f"round {r} {name:8} {us:7.1f} us/msg {per_s:8.0f} msg/s", flush=True)
    med = {k: (statistics.median(cpu[k]), statistics.median(rate[k])) for k in clients}
    print(
        f"median: paho {med['paho'][0]:.1f} us/msg, {med['paho'][1]:.0f} msg/s; chunked "
        f"{med['chunked'][0]:.1f} us/msg, {med['chunked'][1]:.0f} msg/s; CPU ratio "
        f"{med['chunked'][0] / med['paho'][0]:.2f}, rate ratio "
        f"{med['chunked'][1] / med['paho'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
