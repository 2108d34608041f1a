"""Issue 11: the README quick start on a machine where 1883 is taken, and enrolment against
the running controller (``edgefleet devices enroll|revoke``, the credentials API).

Real parts: ``edgefleet controller serve`` as a process with its embedded Mosquitto, the
CLI talking HTTP to it, a real agent on the shipped video, paho clients for the ACL.
"""

from __future__ import annotations

import errno
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controller.api import create_app
from controller.api.credentials import EnrolmentTarget
from controller.broker import DEVICE_ACL, EmbeddedBroker, password_hash
from controller.cli import main
from controller.config import load_config
from controller.db.models import device_credentials
from controller.db.session import Database
from controller.keys import generate_keys
from controller.service import Controller
from tests.agent_proc import REPO, VIDEO, start_agent, stop_agent
from tests.broker import free_port
from tests.waiting import stop_process, wait_for

DEFAULT_MQTT_PORT = 1883


@pytest.fixture
def default_port_taken() -> Iterator[None]:
    """Port 1883 on loopback taken: by the system's Mosquitto here, else by this socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", DEFAULT_MQTT_PORT))
        sock.listen(1)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
    try:
        yield
    finally:
        sock.close()


class Serve:
    """``python -m controller controller serve --data-dir D --dev-token`` (the quick start)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.data = tmp_path / "data"
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.args = args
        self.tmp = tmp_path
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp_path / "serve-0.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "controller",
            "controller",
            "serve",
            "--data-dir",
            str(self.data),
            "--dev-token",
            "--port",
            str(self.api_port),
            *self.args,
        ]

    def start(self) -> str:
        """Start it and wait for "ready"; the printed text."""
        self.log = self.tmp / f"serve-{self.runs}.log"
        self.runs += 1
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"controller exited with {self.proc.returncode}:\n{self.text()}")
            return "\nready" in self.text()

        wait_for(ready, timeout=30, what=lambda: f"the controller to print ready:\n{self.text()}")
        return self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def broker_port(self) -> int:
        found = re.search(
            r"embedded MQTT broker \(mosquitto\): mqtt://127\.0\.0\.1:(\d+)", self.text()
        )
        assert found, self.text()
        return int(found.group(1))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            assert stop_process(proc, timeout=15), self.text()

    def cli(self, *args: str, check: bool = True) -> str | None:
        """The output of ``edgefleet ARGS`` against this controller; None on an error
        (``check=False``)."""
        token = (self.data / "dev-token").read_text().strip()
        result = CliRunner().invoke(
            main, ["--url", self.url, "--token", token, *args], catch_exceptions=False
        )
        if not check and result.exit_code != 0:
            return None
        assert result.exit_code == 0, result.output
        return result.output

    def device(self, device_id: str) -> dict[str, Any] | None:
        """``edgefleet devices show ID --json``'s device; None while it is unknown."""
        out = self.cli("devices", "show", device_id, "--json", check=False)
        return None if out is None else dict(json.loads(out)["device"])


class Probe:
    """A paho MQTT v5 client that records CONNACK/PUBACK reason codes and disconnects."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.events: list[tuple[str, int, str]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(60, 60)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self._add("connack", 0, rc)
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self._add("disconnect", 0, rc)
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self._add("puback", mid, rc)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_for(lambda: self.events, timeout=10, what="a CONNACK", condition=self.cond)

    def _add(self, kind: str, mid: int, rc: ReasonCode) -> None:
        with self.cond:
            self.events.append((kind, mid, str(rc)))
            self.cond.notify_all()

    @property
    def accepted(self) -> bool:
        return self.events[0] == ("connack", 0, "Success")

    def puback(self, topic: str) -> str:
        mid = self.client.publish(topic, b"{}", qos=1).mid
        found = wait_for(
            lambda: next((e[2] for e in self.events if e[:2] == ("puback", mid)), None),
            timeout=10,
            what=f"the PUBACK of {topic}",
            condition=self.cond,
        )
        return str(found)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_embedded_broker_gives_devices_their_own_topics_only_and_reload_revokes(
    tmp_path: Path,
) -> None:
    users = [("cam-1", password_hash("pw-1"))]
    broker = EmbeddedBroker(workdir=tmp_path / "broker", port=0, device_users=lambda: list(users))
    broker.start()
    probes: list[Probe] = []
    try:
        device = Probe(broker.port, "cam-1", "pw-1")
        controller = Probe(broker.port, broker.username, broker.password)
        probes += [device, controller]
        assert device.accepted and controller.accepted
        assert device.puback("edgefleet/v1/cam-1/status") != "Not authorized"
        assert device.puback("edgefleet/v1/cam-2/status") == "Not authorized"
        assert device.puback("edgefleet/v1/cam-1/desired") == "Not authorized"
        assert device.puback("homeassistant/sensor/cam-1/fps/config") != "Not authorized"
        assert controller.puback("edgefleet/v1/cam-1/desired") != "Not authorized"
        assert not Probe(broker.port, "cam-1", "wrong").accepted

        users.clear()
        broker.refresh_users()  # the revoked device is disconnected and refused from now on
        wait_for(
            lambda: any(e[0] == "disconnect" for e in device.events),
            timeout=10,
            what="the revoked device to be disconnected",
            condition=device.cond,
        )
        assert not Probe(broker.port, "cam-1", "pw-1").accepted
        assert controller.puback("edgefleet/v1/cam-1/desired") != "Not authorized"
    finally:
        for p in probes:
            p.close()
        broker.stop()


def test_quick_start_takes_a_free_port_when_1883_is_taken_and_says_which(
    tmp_path: Path, default_port_taken: None
) -> None:
    serve = Serve(tmp_path)
    try:
        printed = serve.start()
        port = serve.broker_port()
        assert port != DEFAULT_MQTT_PORT
        assert "port 1883 on 127.0.0.1 is taken" in printed
        assert f"uses port {port} instead" in printed
        snippet = (serve.data / "broker" / "agent.toml").read_text()
        assert f'url = "mqtt://127.0.0.1:{port}"' in snippet
        assert httpx.get(f"{serve.url}/healthz").json()["mqtt"] == "connected"
    finally:
        serve.stop()


def test_an_explicitly_configured_busy_mqtt_port_is_a_clear_error(
    tmp_path: Path, default_port_taken: None
) -> None:
    serve = Serve(tmp_path, "--mqtt-port", str(DEFAULT_MQTT_PORT))
    done = subprocess.run(
        serve.command(), cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "port 1883 on 127.0.0.1 is already in use" in done.stderr
    assert "--mqtt-port 0" in done.stderr


def test_only_an_unconfigured_embedded_broker_port_falls_back(tmp_path: Path) -> None:
    """embedded_broker.port in the config file counts as explicit, even when it is 1883."""
    explicit = tmp_path / "explicit.toml"
    explicit.write_text(f"[embedded_broker]\nport = {DEFAULT_MQTT_PORT}\n")
    other = tmp_path / "other.toml"
    other.write_text("[api]\nport = 0\n")
    cases = {explicit: False, other: True, None: True}
    for path, fallback in cases.items():
        ctl = Controller(load_config(path, overrides={"data_dir": str(tmp_path / "d")}))
        try:
            assert ctl.embedded_broker is not None
            assert ctl.embedded_broker.port_fallback is fallback, path
        finally:
            ctl.db.dispose()
    loaded = load_config(None, overrides={"data_dir": str(tmp_path / "d")})
    ctl = Controller(loaded, mqtt_port_explicit=True)
    assert ctl.embedded_broker is not None and not ctl.embedded_broker.port_fallback
    ctl.db.dispose()


def test_embedded_broker_acl_is_the_shipped_one() -> None:
    shipped = (REPO / "packaging" / "mosquitto" / "acl").read_text().splitlines()
    assert set(DEVICE_ACL) == {ln for ln in shipped if ln.startswith("pattern ")}


def test_credentials_api_admin_only_hashed_and_409_with_an_external_broker(
    tmp_path: Path, database: Database, tokens: dict[str, str]
) -> None:
    reloads: list[int] = []
    app = create_app(db=database)
    client = TestClient(app)
    path = "/api/v1/devices/cam-1/credentials"

    def auth(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[role]}"}

    # No embedded broker (broker.url set): the controller cannot add users.
    resp = client.post(path, headers=auth("admin"))
    assert resp.status_code == 409 and "--password-file" in resp.json()["detail"]

    key = tmp_path / "signing.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n")
    app.state.enrolment = EnrolmentTarget(
        broker_url=lambda: "mqtt://127.0.0.1:5555",
        reload=lambda: reloads.append(1),
        trusted_keys=[key],
    )
    assert client.post(path, headers=auth("operator")).status_code == 403
    assert (
        client.post("/api/v1/devices/bad id/credentials", headers=auth("admin")).status_code == 422
    )
    resp = client.post(path, headers=auth("admin"))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["broker_url"] == "mqtt://127.0.0.1:5555" and body["username"] == "cam-1"
    assert body["trusted_keys"] == [{"path": str(key), "pem": key.read_text()}]
    with database.begin() as conn:
        stored = conn.execute(device_credentials.select()).one()
    assert stored.password_hash.startswith("$7$") and body["password"] not in stored.password_hash
    assert reloads == [1]
    assert client.delete(path, headers=auth("operator")).status_code == 403
    assert client.delete(path, headers=auth("admin")).json() == {
        "device_id": "cam-1",
        "revoked": True,
    }
    assert reloads == [1, 1]
    resp = client.delete(path, headers=auth("admin"))
    assert resp.status_code == 404 and "no broker login" in resp.json()["detail"]


def test_enroll_refuses_a_bad_device_id_before_calling_the_controller() -> None:
    result = CliRunner().invoke(
        main, ["--url", "http://127.0.0.1:9", "devices", "enroll", "bad id"]
    )
    assert result.exit_code == 1
    assert "error: " in result.output and "device id" in result.output


@pytest.mark.slow
def test_enrolled_agent_connects_survives_a_restart_and_revoke_locks_it_out(
    tmp_path: Path, default_port_taken: None
) -> None:
    _, public, _ = generate_keys(tmp_path / "keys")
    config_file = tmp_path / "controller.toml"  # no embedded_broker.port: 1883 or a free one
    config_file.write_text(f'[models]\ntrusted_keys = ["{public}"]\n')
    serve = Serve(tmp_path, "--config", str(config_file))
    agent: subprocess.Popen[bytes] | None = None
    try:
        serve.start()
        port = serve.broker_port()
        config = tmp_path / "agent" / "agent.toml"
        config.parent.mkdir()
        serve.cli(
            "devices",
            "enroll",
            "cam-1",
            "--state-dir",
            str(tmp_path / "agent" / "state"),
            "--source",
            str(VIDEO),
            "--out",
            str(config),
        )
        assert config.stat().st_mode & 0o777 == 0o600
        text = config.read_text()
        assert f'url = "mqtt://127.0.0.1:{port}"' in text and 'username = "cam-1"' in text
        assert 'trusted_keys = ["agent-trusted-0.pub"]' in text
        assert (config.parent / "agent-trusted-0.pub").read_bytes() == public.read_bytes()
        password = re.search(r'password = "([^"]+)"', text)
        assert password is not None
        # Printing (no --out) gives the same kind of config with a fresh password.
        printed = serve.cli("devices", "enroll", "cam-2") or ""
        assert 'device_id = "cam-2"' in printed and f":{port}" in printed
        assert f'trusted_keys = ["{public}"]' in printed

        # The device's own login: its topics only (the shipped ACL).
        probe = Probe(port, "cam-1", password.group(1))
        assert probe.accepted
        probe.close()

        agent = start_agent(config, tmp_path / "agent.log")

        def online() -> bool:
            device = serve.device("cam-1")
            return device is not None and bool(device["online"])

        def agent_log() -> str:
            return (tmp_path / "agent.log").read_text(errors="replace")

        wait_for(online, timeout=60, what=lambda: f"cam-1 online; agent log:\n{agent_log()}")

        broker_log = serve.data / "broker" / "mosquitto.log"
        # Restart: same broker port, the login is still there, the agent reconnects.
        serve.stop()
        seen = broker_log.read_text().count("u'cam-1'")
        restarted = time.time()
        serve.start()
        assert serve.broker_port() == port
        wait_for(
            lambda: broker_log.read_text().count("u'cam-1'") > seen,
            timeout=60,
            what=lambda: f"the agent to reconnect; agent log:\n{agent_log()}",
        )

        def seen_after_restart() -> bool:
            device = serve.device("cam-1")
            # status_ts too: the agent retains a fresh status on reconnect, not the old one.
            return (
                device is not None
                and device["online"]
                and device["last_seen"] > restarted
                and (device["status_ts"] or 0.0) > restarted
            )

        wait_for(seen_after_restart, timeout=60, what="cam-1 online after the restart")

        # Revoke: the broker reloads and refuses the device's login.
        revoked_at = len(broker_log.read_text())
        assert "revoked" in (serve.cli("devices", "revoke", "cam-1") or "")

        # Mosquitto drops the agent's connection on the reload and refuses its reconnects
        # (the only logins since the revoke, so every "not authorised" line is the agent's).
        def refused() -> bool:
            after = broker_log.read_text()[revoked_at:]
            return (
                "Client edgefleet-agent-cam-1 disconnected." in after
                and "disconnected, not authorised" in after
            )

        wait_for(
            refused,
            timeout=30,
            what=lambda: f"the agent's login to be refused; broker log:\n{broker_log.read_text()}",
        )
        probe = Probe(port, "cam-1", password.group(1))
        probe.close()
        assert not probe.accepted, probe.events
        # The controller shows it offline at once (its last will is refused with its login),
        # says why, and still does after a restart (the retained "online" status is cleared).
        device = serve.device("cam-1")
        assert device is not None and not device["online"] and device["state"] == "revoked"
        events = serve.cli("devices", "show", "cam-1") or ""
        assert "device.revoked" in events, events
        serve.stop()
        serve.start()
        time.sleep(2.0)  # the retained messages of the broker reach the new session
        device = serve.device("cam-1")
        assert device is not None and not device["online"] and device["state"] == "revoked"
    finally:
        if agent is not None:
            stop_agent(agent, timeout=15)
        serve.stop()
    assert agent is not None and agent.returncode is not None
    assert -agent.returncode != signal.SIGKILL


def test_quick_start_without_a_signing_key_says_so_and_trusted_key_fixes_it(
    tmp_path: Path,
) -> None:
    """The plain quick start (`serve --data-dir D --dev-token`) trusts no signing key: the
    controller says so at start, `enroll` warns and the config says why updates are refused;
    `serve --trusted-key` gives enrolled devices the key."""
    _, public, key = generate_keys(tmp_path / "keys")
    serve = Serve(tmp_path, "--mqtt-port", "0")
    try:
        started = serve.start()
        assert "no trusted signing key" in started and "--trusted-key" in started
        printed = serve.cli("devices", "enroll", "cam-1") or ""
        assert "warning: the controller trusts no signing key" in printed
        assert "# No trusted signing key: every model update is refused" in printed
        config = tmp_path / "cam-1.toml"
        config.write_text(printed[printed.index("# edgefleet agent configuration") :])
        checked = subprocess.run(
            [sys.executable, "-m", "agent.cli", "check-config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        serve.stop()

        serve.args = ("--mqtt-port", "0", "--trusted-key", str(public))
        started = serve.start()
        assert f"model bundles must be signed with: {key}" in started
        printed = serve.cli("devices", "enroll", "cam-1") or ""
        assert "warning" not in printed
        assert f'trusted_keys = ["{public}"]' in printed
    finally:
        serve.stop()
