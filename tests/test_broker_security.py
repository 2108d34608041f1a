"""The shipped Mosquitto config and ACL on a real broker, with certificates and passwords
from controller.certs / controller.enroll: TLS, no anonymous access, per-device topics."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controller.certs import init_ca, issue
from controller.enroll import enroll, set_password
from tests.agent_proc import REPO, VIDEO, start_agent, stop_agent
from tests.broker import find_mosquitto, free_port, wait_listening
from tests.waiting import stop_process, wait_for

PACKAGING = REPO / "packaging" / "mosquitto"
CONTROLLER_PASSWORD = "controller-secret"
HOMEASSISTANT_PASSWORD = "ha-secret"


@dataclass
class Broker:
    port: int
    dir: Path
    ca: Path
    proc: subprocess.Popen[bytes]


def _config(tmp: Path, port: int, *, client_certs: bool) -> Path:
    """The shipped edgefleet.conf with this test's paths and port substituted."""
    text = (PACKAGING / "edgefleet.conf").read_text(encoding="utf-8")
    subs = {
        r"^password_file .*$": f"password_file {tmp / 'passwd'}",
        r"^acl_file .*$": f"acl_file {PACKAGING / 'acl'}",
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^cafile .*$": f"cafile {tmp / 'ca' / 'ca.pem'}",
        r"^certfile .*$": f"certfile {tmp / 'ca' / 'server.pem'}",
        r"^keyfile .*$": f"keyfile {tmp / 'ca' / 'server.key'}",
    }
    if client_certs:
        subs[r"^require_certificate false$"] = "require_certificate true"
        subs[r"^#use_identity_as_username true$"] = "use_identity_as_username true"
    for pattern, new in subs.items():
        text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert n == 1, f"packaging/mosquitto/edgefleet.conf has no line matching {pattern}"
    extra = [f"log_dest file {tmp / 'mosquitto.log'}", "log_type all"]
    if os.geteuid() == 0:
        extra.append("user root")
    conf = tmp / "mosquitto.conf"
    conf.write_text(text + "\n".join(extra) + "\n", encoding="utf-8")
    return conf


def _start_broker(tmp: Path, *, client_certs: bool) -> Broker:
    init_ca(tmp / "ca", common_name="test CA", days=2)
    issue(tmp / "ca", name="server", kind="server", days=2)
    set_password(tmp / "passwd", "controller", CONTROLLER_PASSWORD)
    set_password(tmp / "passwd", "homeassistant", HOMEASSISTANT_PASSWORD)
    port = free_port()
    conf = _config(tmp, port, client_certs=client_certs)
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_listening(proc, port, timeout=10, log=tmp / "mosquitto.log")
    return Broker(port=port, dir=tmp, ca=tmp / "ca" / "ca.pem", proc=proc)


def _stop(broker: Broker) -> None:
    stop_process(broker.proc, timeout=10)
    if broker.proc.stderr is not None:
        broker.proc.stderr.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Password authentication over TLS (the shipped config as is)."""
    b = _start_broker(tmp_path_factory.mktemp("pw-broker"), client_certs=False)
    yield b
    _stop(b)


class Client:
    """A paho MQTT v5 client over TLS that records messages and lets tests wait."""

    def __init__(
        self,
        port: int,
        *,
        ca: Path,
        username: str | None = None,
        password: str | None = None,
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connack: ReasonCode | None = None
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.client.tls_set_context(context)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._subacks: list[list[ReasonCode]] = []
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, rcs: list[ReasonCode], _p: object
    ) -> None:
        with self._cond:
            self._subacks.append(rcs)
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        wait_for(
            predicate,
            timeout=timeout,
            what=lambda: f"the client's state to match; messages so far: {self.messages}",
            condition=self._cond,
        )

    def connack_code(self) -> ReasonCode:
        """Wait for the CONNACK and return its reason code."""
        self.wait(lambda: self.connack is not None)
        assert self.connack is not None
        return self.connack

    def connected(self) -> Client:
        assert not self.connack_code().is_failure, self.connack
        return self

    def subscribe(self, topic: str) -> list[ReasonCode]:
        with self._cond:
            n = len(self._subacks)
        self.client.subscribe(topic, qos=1)
        self.wait(lambda: len(self._subacks) > n)
        return self._subacks[n]

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)

    def got(self, topic: str, payload: bytes) -> bool:
        return (topic, payload) in self.messages

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Fleet:
    controller: Client
    a: Client
    b: Client
    a_id: str
    b_id: str


def _connect_enrolled(broker: Broker, username: str, password: str) -> Client:
    """Connect with an enrolled password; the SIGHUP reload is asynchronous, so retry."""

    def attempt() -> Client | None:
        c = Client(broker.port, ca=broker.ca, username=username, password=password)
        if not c.connack_code().is_failure:
            return c
        c.close()
        return None

    return wait_for(attempt, timeout=10, what=f"the broker to accept {username}'s password")


@pytest.fixture
def fleet(broker: Broker) -> Iterator[Fleet]:
    """The controller (subscribed to edgefleet/v1/#) and devices a/b with enrolled passwords."""
    passwd = broker.dir / "passwd"
    suffix = uuid.uuid4().hex[:6]
    a = enroll(f"a-{suffix}", password_file=passwd, ca_file=broker.ca)
    b = enroll(f"b-{suffix}", password_file=passwd, ca_file=broker.ca)
    assert a.password is not None and b.password is not None
    made: list[Client] = []
    try:
        # Connected first: Mosquitto listens before it installs its SIGHUP handler, and a
        # SIGHUP in between ends the process (seen in CI: exit by signal 1).
        ctl = Client(broker.port, ca=broker.ca, username="controller", password=CONTROLLER_PASSWORD)
        made.append(ctl)
        ctl.connected().subscribe("edgefleet/v1/#")
        broker.proc.send_signal(signal.SIGHUP)  # reload the password file, as an operator would
        made.append(_connect_enrolled(broker, a.device_id, a.password))
        made.append(_connect_enrolled(broker, b.device_id, b.password))
        yield Fleet(controller=ctl, a=made[1], b=made[2], a_id=a.device_id, b_id=b.device_id)
    finally:
        for c in made:
            c.close()


def test_device_cannot_publish_to_another_devices_topics(fleet: Fleet) -> None:
    a, ctl, a_id, b_id = fleet.a, fleet.controller, fleet.a_id, fleet.b_id
    a.publish(f"edgefleet/v1/{b_id}/telemetry", b"forged")
    a.publish(f"edgefleet/v1/{b_id}/detections/front", b"forged")
    a.publish(f"edgefleet/v1/{a_id}/telemetry", b"own")
    ctl.wait(lambda: ctl.got(f"edgefleet/v1/{a_id}/telemetry", b"own"))
    assert not any(p == b"forged" for _, p in ctl.messages)


def test_device_cannot_publish_its_own_desired_state(fleet: Fleet) -> None:
    a, ctl, a_id = fleet.a, fleet.controller, fleet.a_id
    a.publish(f"edgefleet/v1/{a_id}/desired", b"self-assigned")
    a.publish(f"edgefleet/v1/{a_id}/detections/front", b"after")
    ctl.wait(lambda: ctl.got(f"edgefleet/v1/{a_id}/detections/front", b"after"))
    assert not ctl.got(f"edgefleet/v1/{a_id}/desired", b"self-assigned")


def test_device_reads_only_its_own_desired_state(fleet: Fleet) -> None:
    a, ctl, a_id, b_id = fleet.a, fleet.controller, fleet.a_id, fleet.b_id
    a.subscribe(f"edgefleet/v1/{b_id}/desired")
    a.subscribe(f"edgefleet/v1/{a_id}/desired")
    ctl.publish(f"edgefleet/v1/{b_id}/desired", b"for-b")
    ctl.publish(f"edgefleet/v1/{a_id}/desired", b"for-a")
    a.wait(lambda: a.got(f"edgefleet/v1/{a_id}/desired", b"for-a"))
    assert not any(p == b"for-b" for _, p in a.messages)
    # the controller really published it: b's desired went through the broker
    ctl.wait(lambda: ctl.got(f"edgefleet/v1/{b_id}/desired", b"for-b"))


def test_device_writes_only_its_own_home_assistant_discovery(broker: Broker, fleet: Fleet) -> None:
    a, a_id, b_id = fleet.a, fleet.a_id, fleet.b_id
    ha = Client(
        broker.port, ca=broker.ca, username="homeassistant", password=HOMEASSISTANT_PASSWORD
    )
    try:
        ha.connected().subscribe("homeassistant/#")
        ha.subscribe(f"edgefleet/v1/{a_id}/detections/+")
        ha.subscribe(f"edgefleet/v1/{a_id}/telemetry")  # not granted to Home Assistant
        a.publish(f"homeassistant/sensor/{b_id}/front_count/config", b"forged")
        a.publish("homeassistant/sensor/front_count/config", b"no-node")
        a.publish(f"edgefleet/v1/{a_id}/telemetry", b"not-for-ha")
        a.publish(f"homeassistant/sensor/{a_id}/front_count/config", b"own")
        a.publish(f"edgefleet/v1/{a_id}/detections/front", b"det")
        ha.wait(lambda: ha.got(f"edgefleet/v1/{a_id}/detections/front", b"det"))
        ha.wait(lambda: ha.got(f"homeassistant/sensor/{a_id}/front_count/config", b"own"))
        assert not any(p in (b"forged", b"no-node", b"not-for-ha") for _, p in ha.messages)
    finally:
        ha.close()


def test_anonymous_client_is_not_authorized(broker: Broker) -> None:
    anon = Client(broker.port, ca=broker.ca)
    try:
        code = anon.connack_code()
        assert code.is_failure
        assert code.value == 135, code  # Not authorized
    finally:
        anon.close()


def test_wrong_password_is_refused(broker: Broker) -> None:
    bad = Client(broker.port, ca=broker.ca, username="controller", password="wrong")
    try:
        code = bad.connack_code()
        assert code.is_failure
        assert code.value in (134, 135), code  # Bad user name or password / Not authorized
    finally:
        bad.close()


def test_tls_handshake_fails_with_a_ca_that_did_not_sign_the_server(
    broker: Broker, tmp_path: Path
) -> None:
    other = init_ca(tmp_path / "other-ca", common_name="someone else", days=1)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set_context(ssl.create_default_context(cafile=str(other.cert)))
    client.username_pw_set("controller", CONTROLLER_PASSWORD)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("127.0.0.1", broker.port, keepalive=5)


def test_agent_publishes_detections_over_mqtts_with_a_device_certificate(
    tmp_path: Path,
) -> None:
    b = _start_broker(tmp_path / "cert-broker", client_certs=True)
    ctl: Client | None = None
    agent = None
    try:
        ctl_cert = issue(b.dir / "ca", name="controller", kind="device", days=1)
        ctl = Client(b.port, ca=b.ca, cert=(ctl_cert.cert, ctl_cert.key)).connected()
        ctl.subscribe("edgefleet/v1/#")
        enrolled = enroll(
            "cam-tls",
            broker_url=f"mqtts://127.0.0.1:{b.port}",
            ca_file=b.ca,
            cert_dir=tmp_path / "device",
            state_dir=str(tmp_path / "state"),
            source=str(VIDEO),
        )
        config = tmp_path / "agent.toml"
        # the stream table is last: these keys belong to it
        config.write_text(enrolled.config + "realtime = false\nloop = false\n", encoding="utf-8")
        agent = start_agent(config, tmp_path / "agent.log")
        topic = "edgefleet/v1/cam-tls/detections/front"
        try:
            ctl.wait(lambda: any(t == topic for t, _ in ctl.messages), timeout=40)
        except AssertionError:
            log = (tmp_path / "agent.log").read_text(errors="replace")
            raise AssertionError(f"no detections over TLS; agent log:\n{log[-3000:]}") from None
        assert any(t == "edgefleet/v1/cam-tls/status" for t, _ in ctl.messages)
    finally:
        if agent is not None:
            stop_agent(agent)
        if ctl is not None:
            ctl.close()
        _stop(b)
