"""The controller's MQTT client reads its socket in chunks (controller.mqtt_reads), against a
real Mosquitto: every message intact and in order, packets larger than a chunk and split
across chunks included, far fewer socket reads than messages, and reconnects still work."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.db.session import Database
from controller.fleet.history import count_telemetry
from controller.ingest.decode import INGESTED_KINDS
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from controller.mqtt_reads import READ_CHUNK, ChunkedReadClient
from tests.broker import Mosquitto
from tests.waiting import wait_for
from tools.simulator.load import publish_load, telemetry_payloads

pytestmark = pytest.mark.slow

TOPIC = "bench/reads"


def _session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    return props


class _Receiver:
    """A ChunkedReadClient with a persistent session, collecting what it receives."""

    def __init__(self, port: int, client_id: str) -> None:
        self.port = port
        self.payloads: list[bytes] = []
        self.cond = threading.Condition()
        self.client = ChunkedReadClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.payloads.append(bytes(msg.payload))
            self.cond.notify_all()

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=_session_props())
        self.client.loop_start()

    def subscribe_then_leave(self) -> None:
        """Subscribe with a persistent session and disconnect: the broker queues for it."""
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.start()
        self.client.subscribe(TOPIC, qos=1)
        assert done.wait(10), "no SUBACK"
        self.stop()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, count: int, timeout: float = 30) -> list[bytes]:
        with self.cond:
            wait_for(
                lambda: len(self.payloads) >= count,
                timeout=timeout,
                what=lambda: f"{count} messages; got {len(self.payloads)}",
                condition=self.cond,
            )
            return list(self.payloads)


def _publish(port: int, payloads: list[bytes], qos: int) -> None:
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        infos = [pub.publish(TOPIC, p, qos=qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        pub.disconnect()
        pub.loop_stop()


def _payload(i: int) -> bytes:
    """Sizes from a few bytes to three chunks, so packets straddle chunk boundaries."""
    size = (
        (7, 180, 1500, READ_CHUNK - 3, 3 * READ_CHUNK + 11)[i % 5] if i % 50 == 0 else 40 + i % 300
    )
    head = b"%08d:" % i
    return head + bytes((i + k) % 251 for k in range(max(0, size - len(head))))


@pytest.mark.parametrize("qos", [0, 1])
def test_messages_arrive_intact_in_order_with_few_socket_reads(
    mosquitto: Mosquitto, qos: int
) -> None:
    """QoS 1: a backlog queued for the session; QoS 0 (not queued offline): live."""
    receiver = _Receiver(mosquitto.port, f"reads-{qos}")
    receiver.subscribe_then_leave()
    sent = [_payload(i) for i in range(3000)]
    if qos == 0:
        receiver.start()
    _publish(mosquitto.port, sent, qos)
    if qos == 1:
        receiver.start()
    try:
        got = receiver.wait_for(len(sent))
    finally:
        receiver.stop()
    assert len(got) == len(sent)
    for i, (a, b) in enumerate(zip(got, sent, strict=True)):
        assert a == b, f"message {i} differs ({len(a)} against {len(b)} bytes)"
    # paho alone reads every packet with 3-5 recv calls.
    assert receiver.client.socket_reads < len(sent) / 5, receiver.client.socket_reads


def test_reads_go_on_after_the_broker_restarts(mosquitto: Mosquitto) -> None:
    receiver = _Receiver(mosquitto.port, "reads-restart")
    receiver.subscribe_then_leave()
    _publish(mosquitto.port, [_payload(i) for i in range(500)], 1)
    receiver.start()
    try:
        receiver.wait_for(500)
        mosquitto.restart()  # the session survives (persistence); the socket does not
        _publish(mosquitto.port, [_payload(i) for i in range(500, 800)], 1)
        with receiver.cond:
            wait_for(
                lambda: len(_after(receiver.payloads, 500)) >= 300,
                timeout=30,
                what="the messages published after the restart",
                condition=receiver.cond,
            )
            got = list(receiver.payloads)
    finally:
        receiver.stop()
    # The restarted broker may deliver again what it had not saved as acknowledged.
    assert _after(got, 500) == [_payload(i) for i in range(500, 800)]


def _after(payloads: list[bytes], first: int) -> list[bytes]:
    return [p for p in payloads if int(p[:8]) >= first]


def test_the_controller_subscriber_reads_in_chunks(mosquitto: Mosquitto, tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade()
    ingestor = Ingestor(db=db)

    def subscriber() -> MqttSubscriber:
        return MqttSubscriber(
            settings=MqttSettings(url=mosquitto.url, client_id="ctl-reads"),
            kinds=INGESTED_KINDS,
            on_message=ingestor.handle,
        )

    sub = subscriber()
    sub.start()
    sub.stop()
    publish_load(
        broker_url=mosquitto.url,
        payloads=telemetry_payloads([f"cam-{n}" for n in range(20)], per_device=50),
        qos=1,
    )
    sub = subscriber()
    sub.start()
    try:
        wait_for(lambda: ingestor.stats.queued >= 1000, timeout=30, what="the backlog")
        client = sub._client
        assert isinstance(client, ChunkedReadClient)
        assert client.socket_reads < 200, client.socket_reads
    finally:
        sub.stop()
    ingestor.write_pending()
    with db.connect() as conn:
        assert count_telemetry(conn) == 1000
    db.dispose()
