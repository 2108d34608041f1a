"""The rollout runner: PostgreSQL leadership (one replica drives rollouts), retained QoS 1
desired states through a real Mosquitto, re-publication after a session loss."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from controller.db.session import Database
from controller.mqtt import MqttSettings, MqttSubscriber
from controller.rollouts.publisher import DesiredPublisher
from controller.rollouts.runner import Leadership, RolloutRunner
from protocol import Desired, decode
from tests.broker import Mosquitto
from tests.controller.conftest import PG_BASE, Clock
from tests.controller.rollout_fleet import Fleet
from tests.mqtt_sub import Subscriber
from tests.waiting import wait_for


@pytest.fixture
def other_pg_schema() -> Iterator[str]:
    schema = f"ef_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres
def test_on_postgresql_one_replica_leads_and_a_dead_leader_hands_over(
    pg_url: str, other_pg_schema: str
) -> None:
    dbs = [Database.from_url(pg_url) for _ in range(2)]
    elsewhere = Database.from_url(other_pg_schema)
    try:
        first, second = Leadership(dbs[0]), Leadership(dbs[1])
        assert first.acquire() and first.held
        assert first.acquire()  # still held: the lock's connection is alive
        assert not second.acquire() and not second.held
        # Another installation (schema) in the same database is not blocked.
        assert Leadership(elsewhere).acquire()
        # The leader dies: its connection goes, and with it the session-level lock.
        assert first._conn is not None
        first._conn.invalidate()
        first._conn = None
        assert second.acquire()
        assert not first.acquire()
        second.release()
        assert first.acquire()
        first.release()
    finally:
        for db in (*dbs, elsewhere):
            db.dispose()


def test_on_sqlite_the_process_always_leads(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'c.db'}")
    assert Leadership(db).acquire() and Leadership(db).acquire()
    db.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_runner_publishes_retained_qos1_desired_states_and_again_after_a_session_loss(
    database: Database, clock: Clock, mosquitto: Mosquitto
) -> None:
    fleet = Fleet(database, clock)
    fleet.model()
    fleet.add("dev-00", "dev-01")
    mqtt = MqttSubscriber(
        settings=MqttSettings(url=mosquitto.url, client_id="ctl-runner"),
        kinds=(),
        on_message=lambda *_: None,
    )
    mqtt.start()
    publisher = DesiredPublisher(database, publish=mqtt.publish_confirmed, clock=clock)
    runner = RolloutRunner(
        db=database, engine=fleet.engine, publisher=publisher, interval_s=0.05, clock=clock
    )
    try:
        r = fleet.create(stages="100%")
        runner.start()
        wait_for(
            lambda: publisher.published >= 2, timeout=15, what="both desired states acknowledged"
        )
        assert all(fleet.desired(d).published for d in ("dev-00", "dev-01"))  # type: ignore[union-attr]
        sub = Subscriber(mosquitto.port, ["edgefleet/v1/+/desired"], persistent=False)
        got = sub.wait_for(lambda ms: len(ms) >= 2)
        sub.close()
        assert all(m.retain for m in got)
        desired = {m.topic: decode(m.payload, Desired) for m in got}
        assert desired["edgefleet/v1/dev-00/desired"].rev == 1
        assert desired["edgefleet/v1/dev-00/desired"].rollout_id == str(r.id)
        runner.on_session(False)  # a new broker session: everything goes out again
        wait_for(
            lambda: publisher.published >= 4, timeout=15, what="the desired states published again"
        )
    finally:
        runner.stop()
        mqtt.stop()
    assert mqtt.publish_confirmed([("edgefleet/v1/dev-00/desired", b"{}")]) == [False]
