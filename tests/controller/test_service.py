"""The composition root in-process: zero config with the embedded broker; MQTT sessions and
shared subscriptions against a real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from controller.db.session import Database
from controller.fleet.devices import get_device
from controller.fleet.history import count_telemetry
from controller.fleet.retention import RetentionResult
from controller.ingest.decode import INGESTED_KINDS
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from controller.service import build_controller
from tests.broker import Mosquitto
from tests.waiting import wait_for
from tools.simulator.device import SimulatedDevice
from tools.simulator.load import publish_load, telemetry_payloads

pytestmark = pytest.mark.slow


def test_zero_config_controller_runs_an_embedded_broker_that_agents_can_use(
    tmp_path: Path,
) -> None:
    ctl = build_controller(
        {
            "data_dir": str(tmp_path / "data"),
            "embedded_broker": {"port": 0},
            "api": {"port": 0},
            "ingest": {"flush_interval_s": 0.05},
        }
    )
    ctl.start()
    try:
        info = ctl.broker
        assert info.embedded and info.username == "edgefleet" and info.password
        assert (tmp_path / "data" / "controller.db").is_file()
        assert info.url in ctl.describe() and info.password not in ctl.describe()
        agent_toml = (tmp_path / "data" / "broker" / "agent.toml").read_text()
        assert f'password = "{info.password}"' in agent_toml
        token = ctl.create_dev_token()
        assert (tmp_path / "data" / "dev-token").read_text().strip() == token

        # Anonymous clients are refused; the printed credentials work (MQTT v5).
        with pytest.raises(TimeoutError):
            SimulatedDevice(device_id="anon", broker_url=info.url).connect(timeout=2)
        device = SimulatedDevice(
            device_id="dev-1", broker_url=info.url, username=info.username, password=info.password
        )
        device.connect()
        device.announce()
        headers = {"Authorization": f"Bearer {token}"}

        def online() -> bool:
            resp = httpx.get(f"{ctl.api_url}/api/v1/devices/dev-1", headers=headers)
            return resp.status_code == 200 and resp.json()["online"]

        wait_for(online, timeout=15, what="the device to appear online")
        device.stop(graceful=True)
        wait_for(lambda: not online(), timeout=15, what="the graceful offline status")
        assert ctl.run_retention() == RetentionResult()  # nothing old enough yet
        metrics = httpx.get(f"{ctl.api_url}/metrics").text
        assert "edgefleet_mqtt_connected 1.0" in metrics
        assert 'edgefleet_ingest_messages_stored_total{kind="telemetry"} 1.0' in metrics
    finally:
        ctl.stop()
    assert ctl.embedded_broker is not None and ctl.embedded_broker.proc is None


def _subscriber(url: str, ingestor: Ingestor, client_id: str, group: str | None) -> MqttSubscriber:
    return MqttSubscriber(
        settings=MqttSettings(url=url, client_id=client_id, shared_group=group),
        kinds=INGESTED_KINDS,
        on_message=ingestor.handle,
    )


def test_messages_published_while_the_controller_is_down_arrive_after_it_reconnects(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade()
    ingestor = Ingestor(db=db)
    sub = _subscriber(mosquitto.url, ingestor, "ctl-session", None)
    sub.start()
    sub.stop()
    payloads = telemetry_payloads(["cam-1", "cam-2"], per_device=10)
    publish_load(broker_url=mosquitto.url, payloads=payloads, qos=1)
    sub = _subscriber(mosquitto.url, ingestor, "ctl-session", None)
    sub.start()
    try:
        wait_for(lambda: ingestor.stats.queued >= 20, timeout=15, what="the queued QoS 1 messages")
    finally:
        sub.stop()
    ingestor.write_pending()
    with db.connect() as conn:
        assert count_telemetry(conn) == 20
        assert get_device(conn, "cam-2") is not None
    db.dispose()


def test_replicas_with_a_shared_group_split_the_messages_without_duplicates(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade()
    replicas = [Ingestor(db=db), Ingestor(db=db)]
    subs = [
        _subscriber(mosquitto.url, ing, f"ctl-{i}", "controllers") for i, ing in enumerate(replicas)
    ]
    assert subs[0].filters[0] == "$share/controllers/edgefleet/v1/+/status"
    for sub in subs:
        sub.start()
    try:
        publish_load(
            broker_url=mosquitto.url,
            payloads=telemetry_payloads([f"cam-{i}" for i in range(10)], per_device=6),
            qos=1,
        )
        wait_for(
            lambda: sum(r.stats.queued for r in replicas) >= 60, timeout=15, what="all 60 messages"
        )
    finally:
        for sub in subs:
            sub.stop()
    for r in replicas:
        r.write_pending()
    assert all(r.stats.stored > 0 for r in replicas)
    assert sum(r.stats.stored for r in replicas) == 60
    with db.connect() as conn:
        assert count_telemetry(conn) == 60
    db.dispose()
