"""The controller's MQTT client reads its socket in chunks (controller.mqtt_reads), against a
real Mosquitto: every message intact and in order, packets larger than a chunk and split
across chunks included, far fewer socket reads than messages, and reconnects still work."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.db.session import Database
from controller.fleet.history import count_telemetry
from controller.ingest.decode import INGESTED_KINDS
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from controller.mqtt_reads import READ_CHUNK, ChunkedReadClient
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for
from tools.simulator.load import publish_load, telemetry_payloads

pytestmark = pytest.mark.slow

TOPIC = "bench/reads"


def _chunked(port: int, client_id: str) -> Subscriber:
    """A persistent-session subscriber on TOPIC whose client is a ChunkedReadClient."""
    return Subscriber(port, [TOPIC], client_id=client_id, client_class=ChunkedReadClient)


def _reads(sub: Subscriber) -> int:
    assert isinstance(sub.client, ChunkedReadClient)
    return sub.client.socket_reads


def _publish(broker: Mosquitto, payloads: list[bytes], qos: int) -> None:
    publish_load(broker_url=broker.url, payloads=[(TOPIC, p) for p in payloads], qos=qos)


def _payloads(sub: Subscriber, count: int) -> list[bytes]:
    return [m.payload for m in sub.wait_for(lambda ms: len(ms) >= count, timeout=30)]


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
    sent = [_payload(i) for i in range(3000)]
    sub = _chunked(mosquitto.port, f"reads-{qos}")
    if qos == 1:
        sub.close()  # the broker queues for its session
        _publish(mosquitto, sent, qos)
        sub = _chunked(mosquitto.port, f"reads-{qos}")
    else:
        _publish(mosquitto, sent, qos)
    try:
        got = _payloads(sub, len(sent))
    finally:
        sub.close()
    assert len(got) == len(sent)
    for i, (a, b) in enumerate(zip(got, sent, strict=True)):
        assert a == b, f"message {i} differs ({len(a)} against {len(b)} bytes)"
    # paho alone reads every packet with 3-5 recv calls.
    assert _reads(sub) < len(sent) / 5, _reads(sub)


def test_reads_go_on_after_the_broker_restarts(mosquitto: Mosquitto) -> None:
    _chunked(mosquitto.port, "reads-restart").close()
    _publish(mosquitto, [_payload(i) for i in range(500)], 1)
    sub = _chunked(mosquitto.port, "reads-restart")
    try:
        _payloads(sub, 500)
        mosquitto.restart()  # the session survives (persistence); the socket does not
        _publish(mosquitto, [_payload(i) for i in range(500, 800)], 1)
        got = [
            m.payload
            for m in sub.wait_for(
                lambda ms: len(_after([m.payload for m in ms], 500)) >= 300, timeout=30
            )
        ]
    finally:
        sub.close()
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
