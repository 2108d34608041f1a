"""Session takeover and packet size on real Mosquitto brokers: the shipped config
(packaging/mosquitto, every security line as shipped) and the embedded broker's.

A device that connects with its own credentials and another device's client id must not
disconnect that device (whose will would then tell the controller it is offline); its
own reconnects and the controller's client must keep working; packets up to
``controller.broker.MAX_PACKET_SIZE`` go through, larger ones are dropped.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from controller.broker import MAX_PACKET_SIZE, PACKET_HEADROOM, EmbeddedBroker
from controller.certs import init_ca, issue
from controller.enroll import enroll, set_password
from controller.ingest.decode import INGESTED_KINDS
from controller.mqtt import MqttSettings, MqttSubscriber
from protocol.limits import BROKER_MESSAGE_SIZE_LIMIT
from tests.agent_proc import REPO
from tests.broker import find_mosquitto, free_port, wait_listening
from tests.waiting import stop_process, wait_for

PACKAGING = REPO / "packaging" / "mosquitto"
CONTROLLER_PASSWORD = "controller-secret"
REPLICA_PASSWORD = "replica-secret"
LONG_ID = "d" * 64  # the longest device id and stream name: the longest edgefleet topic


# --- brokers --------------------------------------------------------------------------------


@dataclass
class Broker:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None
    ca: Path | None = None
    passwords: dict[str, str] = field(default_factory=dict)
    log: Path | None = None


def _replica_acl(tmp: Path) -> Path:
    """The shipped ACL plus a second controller replica's user, as README.md says: a copy of
    the ``user controller`` block under the replica's username."""
    shipped = (PACKAGING / "acl").read_text(encoding="utf-8")
    block = re.search(r"^user controller\n(?:topic .*\n)+", shipped, flags=re.MULTILINE)
    assert block is not None, "packaging/mosquitto/acl has no `user controller` block"
    acl = tmp / "acl"
    acl.write_text(shipped + "\n" + block.group(0).replace("controller", "controller-2", 1))
    return acl


def _shipped_config(tmp: Path, port: int, acl: Path) -> Path:
    """packaging/mosquitto/edgefleet.conf with only its paths and port replaced."""
    text = (PACKAGING / "edgefleet.conf").read_text(encoding="utf-8")
    subs = {
        r"^password_file .*$": f"password_file {tmp / 'passwd'}",
        r"^acl_file .*$": f"acl_file {acl}",
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^cafile .*$": f"cafile {tmp / 'ca' / 'ca.pem'}",
        r"^certfile .*$": f"certfile {tmp / 'ca' / 'server.pem'}",
        r"^keyfile .*$": f"keyfile {tmp / 'ca' / 'server.key'}",
    }
    for pattern, new in subs.items():
        text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert n == 1, f"packaging/mosquitto/edgefleet.conf has no line matching {pattern}"
    conf = tmp / "mosquitto.conf"
    extra = [f"log_dest file {tmp / 'mosquitto.log'}", "log_type all"]
    if os.geteuid() == 0:
        extra.append("user root")
    conf.write_text(text + "\n".join(extra) + "\n", encoding="utf-8")
    return conf


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("takeover-broker")
    init_ca(tmp / "ca", common_name="test CA", days=2)
    issue(tmp / "ca", name="server", kind="server", days=2)
    passwords = {"controller": CONTROLLER_PASSWORD, "controller-2": REPLICA_PASSWORD}
    for user, password in passwords.items():
        set_password(tmp / "passwd", user, password)
    for device in ("dev-a", "dev-b", LONG_ID):
        e = enroll(device, password_file=tmp / "passwd", ca_file=tmp / "ca" / "ca.pem")
        assert e.password is not None
        passwords[device] = e.password
    port = free_port()
    conf = _shipped_config(tmp, port, _replica_acl(tmp))
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log = tmp / "mosquitto.log"
    wait_listening(proc, port, timeout=10, log=log)
    yield Broker(port, tmp, proc, ca=tmp / "ca" / "ca.pem", passwords=passwords, log=log)
    stop_process(proc, timeout=10)
    assert proc.stderr is not None
    proc.stderr.close()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = EmbeddedBroker(workdir=tmp_path_factory.mktemp("embedded"), port=0, password="pw")
    b.start()
    yield Broker(b.port, b.workdir, None, passwords={"edgefleet": "pw"}, log=b.log_path)
    b.stop()


# --- a client that records what happens to it ------------------------------------------------


class Conn:
    """A paho MQTT v5 client (TLS when the broker has a CA) with a given client id and will,
    that never reconnects by itself and records CONNACKs, disconnects and messages."""

    def __init__(
        self,
        broker: Broker,
        username: str,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        persistent: bool = False,
    ) -> None:
        self.cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnects: list[ReasonCode] = []
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if broker.ca is not None:
            self.client.tls_set_context(ssl.create_default_context(cafile=str(broker.ca)))
        self.client.username_pw_set(username, broker.passwords[username])
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = 600
        self.client.connect(
            "127.0.0.1", broker.port, keepalive=30, clean_start=not persistent, properties=props
        )
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "the CONNACK")
        assert self.connack is not None and not self.connack.is_failure, self.connack

    def _on_connect(
        self, _c: object, _u: object, flags: object, rc: ReasonCode, _p: object
    ) -> None:
        with self.cond:
            self.connack = rc
            self.session_present = bool(getattr(flags, "session_present", False))
            self.cond.notify_all()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        with self.cond:
            self.disconnects.append(rc)
            self.cond.notify_all()

    def _on_subscribe(
        self, _c: object, _u: object, mid: int, rcs: list[ReasonCode], _p: object
    ) -> None:
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
        wait_for(predicate, timeout=timeout, what=what, condition=self.cond)

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK granting it."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        self.wait(lambda: mid in self.subacks, f"the SUBACK for {topic}")
        assert not self.subacks[mid][0].is_failure, self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, wait: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if wait:
            info.wait_for_publish(10)

    def got(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        self.wait(
            lambda: (topic, payload) in self.messages, f"{payload[:30]!r} on {topic}", timeout
        )

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [p for _, p in self.messages]

    def close(self, *, with_will: bool = False) -> None:
        if with_will:  # MQTT v5 reason 0x04: the broker publishes the will
            self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        else:
            self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ctl(shipped: Broker) -> Iterator[Conn]:
    """The controller's login, subscribed to everything devices publish."""
    c = Conn(shipped, "controller")
    c.subscribe("edgefleet/v1/#")
    yield c
    c.close()


# --- the shipped config -------------------------------------------------------------------


@pytest.mark.parametrize("stolen", ["edgefleet-agent-dev-b", "dev-b"])
def test_a_device_cannot_take_over_another_devices_client_id(
    shipped: Broker, ctl: Conn, stolen: str
) -> None:
    """``stolen``: the agent's default client id for b, and b's username."""
    b = Conn(shipped, "dev-b", client_id="edgefleet-agent-dev-b", will=_will("dev-b"))
    try:
        a = Conn(shipped, "dev-a", client_id=stolen)  # a's own password, b's client id
        a.publish("edgefleet/v1/dev-a/events", b"a-connected")
        ctl.got("edgefleet/v1/dev-a/events", b"a-connected")  # a's CONNECT was handled
        # Before b publishes: a taken-over b would fail in paho ("not currently connected")
        # instead of saying what happened.
        with b.cond:
            assert b.disconnects == [], (
                f"device b was disconnected by a's connection: {b.disconnects}"
            )
        assert b.client.is_connected(), "device b was disconnected by a's connection"
        b.publish("edgefleet/v1/dev-b/events", b"b-still-here")
        ctl.got("edgefleet/v1/dev-b/events", b"b-still-here")
        assert b.disconnects == [], "device b was disconnected by a's connection"
        assert b"b-will" not in ctl.payloads(), "b's will was published: it looks offline"
        a.close()
    finally:
        b.close()


def test_a_device_cannot_publish_a_will_on_another_devices_topics(
    shipped: Broker, ctl: Conn
) -> None:
    forged = Conn(shipped, "dev-a", will=("edgefleet/v1/dev-b/status", b"forged-will"))
    forged.close(with_will=True)
    own = Conn(shipped, "dev-a", will=("edgefleet/v1/dev-a/status", b"a-will"))
    own.close(with_will=True)
    ctl.got("edgefleet/v1/dev-a/status", b"a-will")  # wills are delivered: a's own is
    assert b"forged-will" not in ctl.payloads()


def test_a_devices_own_reconnect_resumes_its_session(shipped: Broker, ctl: Conn) -> None:
    """b reconnects (a new connection while the old one still looks alive, as after a
    network change, then again after a clean disconnect): its session and queued desired
    state survive under its client id."""
    topic = "edgefleet/v1/dev-b/desired"
    first = Conn(shipped, "dev-b", client_id="edgefleet-agent-dev-b", persistent=True)
    first.subscribe(topic)
    first.publish("edgefleet/v1/dev-b/events", b"subscribed")
    ctl.got("edgefleet/v1/dev-b/events", b"subscribed")
    second = Conn(shipped, "dev-b", client_id="another-id-of-b", persistent=True)
    first.wait(lambda: first.disconnects, "the stale connection to be replaced")
    assert second.session_present, "b's own reconnect did not resume its session"
    second.close()
    ctl.publish(topic, b"desired-while-offline")
    third = Conn(shipped, "dev-b", client_id="edgefleet-agent-dev-b", persistent=True)
    try:
        assert third.session_present
        third.got(topic, b"desired-while-offline")
    finally:
        third.close()
        first.client.loop_stop()


def test_the_controllers_client_and_a_second_replica_connect_and_share_messages(
    shipped: Broker,
) -> None:
    """The controller's own MQTT client (controller.mqtt) on the shipped config; a second
    replica with its own username, as README.md says, in the same shared group."""
    received: dict[str, list[str]] = {"controller": [], "controller-2": []}
    lock = threading.Lock()

    def replica(user: str) -> MqttSubscriber:
        def on_message(topic: str, _payload: bytes) -> None:
            with lock:
                received[user].append(topic)

        return MqttSubscriber(
            settings=MqttSettings(
                url=f"mqtts://127.0.0.1:{shipped.port}",
                client_id="edgefleet-controller-host",  # the same configured id: ignored
                username=user,
                password=shipped.passwords[user],
                ca_file=str(shipped.ca),
                shared_group="controllers",
            ),
            kinds=INGESTED_KINDS,
            on_message=on_message,
        )

    replicas = [replica("controller"), replica("controller-2")]
    device = Conn(shipped, "dev-b")
    try:
        for r in replicas:
            r.start(wait=True)
        n = 0

        def both_got_some() -> bool:
            nonlocal n
            n += 1
            device.publish("edgefleet/v1/dev-b/events", b'{"n": %d}' % n)
            with lock:
                return all(received.values())

        wait_for(both_got_some, timeout=15, what=lambda: f"both replicas to receive: {received}")
        assert all(r.connected for r in replicas), "a replica was disconnected by the other"
        assert replicas[0].publish_confirmed([("edgefleet/v1/dev-b/desired", b"{}")]) == [True]
    finally:
        device.close()
        for r in replicas:
            r.stop()


def _will(device: str) -> tuple[str, bytes]:
    return f"edgefleet/v1/{device}/status", f"{device.rsplit('-', maxsplit=1)[-1]}-will".encode()


# --- packet size ----------------------------------------------------------------------------


def _payload_for_packet(topic: str, size: int) -> bytes:
    """A payload making a QoS 1 MQTT v5 PUBLISH (no properties) on ``topic`` ``size`` bytes as
    Mosquitto 2.0 counts a packet against ``max_packet_size``: its first byte plus the
    remaining length (topic with its 2-byte length, packet id, property length, payload);
    the 2-4 bytes encoding the remaining length are not counted."""
    return b"x" * (size - 1 - (2 + len(topic.encode()) + 2 + 1))


def test_the_shipped_packet_limit_is_the_protocols() -> None:
    text = (PACKAGING / "edgefleet.conf").read_text(encoding="utf-8")
    values = re.findall(r"^max_packet_size (\d+)$", text, flags=re.MULTILINE)
    assert values == [str(MAX_PACKET_SIZE)]
    assert MAX_PACKET_SIZE == BROKER_MESSAGE_SIZE_LIMIT + PACKET_HEADROOM
    assert not re.search(r"^message_size_limit", text, flags=re.MULTILINE)
    # The longest edgefleet PUBLISH with the largest payload fits the headroom.
    longest = f"edgefleet/v1/{LONG_ID}/detections/{LONG_ID}"
    overhead = 5 + 2 + len(longest) + 2 + 4
    assert overhead < PACKET_HEADROOM


def _check_packet_limit(broker: Broker, device: str, subscriber: Conn) -> None:
    topic = f"edgefleet/v1/{device}/telemetry"
    largest = b"L" * BROKER_MESSAGE_SIZE_LIMIT
    at_limit = _payload_for_packet(topic, MAX_PACKET_SIZE)
    over = _payload_for_packet(topic, MAX_PACKET_SIZE + 1)
    sender = Conn(broker, device)
    sender.publish(topic, largest)
    subscriber.got(topic, largest)
    sender.publish(topic, at_limit)
    subscriber.got(topic, at_limit)
    sender.publish(topic, over, wait=False)
    sender.wait(lambda: sender.disconnects, "the broker to disconnect the oversized sender")
    sender.client.loop_stop()
    after = Conn(broker, device)
    after.publish(topic, b"after")
    subscriber.got(topic, b"after")
    after.close()
    assert over not in subscriber.payloads()
    assert broker.log is not None
    assert "recommended to replace" not in broker.log.read_text(errors="replace")


def test_the_shipped_broker_delivers_up_to_the_limit_and_drops_larger(
    shipped: Broker, ctl: Conn
) -> None:
    _check_packet_limit(shipped, "dev-a", ctl)
    # The largest edgefleet message on the longest topic goes through.
    topic = f"edgefleet/v1/{LONG_ID}/detections/{LONG_ID}"
    payload = b"D" * BROKER_MESSAGE_SIZE_LIMIT
    longest = Conn(shipped, LONG_ID)
    longest.publish(topic, payload)
    ctl.got(topic, payload)
    longest.close()


def test_the_embedded_broker_delivers_up_to_the_limit_and_drops_larger(embedded: Broker) -> None:
    conf = (embedded.dir / "mosquitto.conf").read_text(encoding="utf-8")
    assert f"\nmax_packet_size {MAX_PACKET_SIZE}\n" in conf
    subscriber = Conn(embedded, "edgefleet")
    subscriber.subscribe("edgefleet/v1/#")
    try:
        _check_packet_limit(embedded, "edgefleet", subscriber)
    finally:
        subscriber.close()
