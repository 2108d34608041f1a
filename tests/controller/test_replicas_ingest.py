"""What several controller replicas need from ingestion (docs/scaling.md, "Ingestion that
survives a replica"), on SQLite and PostgreSQL:

- a QoS 1 message is acknowledged to the broker only after its batch is committed (and at
  once when it is refused for good), never when it is lost;
- a reported state older than the stored one (committed by another replica) does not
  overwrite it;
- two writers with overlapping devices in opposite orders do not deadlock.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from controller.db.models import device_streams, devices
from controller.db.session import Database
from controller.fleet.writes import Received, collect, write_batch, write_messages
from controller.ingest.writer import Ingestor
from protocol import Reported, StreamReport, encode, telemetry_topic
from tests.controller.conftest import telemetry


def _report(device_id: str, ts: float, phase: str) -> Received:
    msg = Reported(
        schema=1,
        device_id=device_id,
        ts=ts,
        desired_rev=1,
        streams={"cam0": StreamReport(active="m@1", phase=phase, target="m@2")},  # type: ignore[arg-type]
    )
    return Received(topic="t", device_id=device_id, message=msg, received_at=ts)


def test_a_message_is_acknowledged_after_its_commit_and_a_refused_one_at_once(
    database: Database,
) -> None:
    ingestor = Ingestor(db=database)
    acked: list[str] = []
    good = encode(telemetry("d1"))
    assert ingestor.handle(telemetry_topic("d1"), good, lambda: acked.append("good")) == "queued"
    assert ingestor.handle(telemetry_topic("d1"), b"{not json", lambda: acked.append("bad")) == (
        "malformed"
    )
    assert acked == ["bad"]  # the good one waits for the database
    assert ingestor.write_pending() == 1
    assert acked == ["bad", "good"]
    with database.connect() as conn:
        assert conn.execute(select(devices.c.id)).scalars().all() == ["d1"]


def test_an_older_reported_state_does_not_overwrite_a_newer_one(database: Database) -> None:
    with database.begin() as conn:
        write_messages(conn, [_report("d1", 200.0, "committed")])
    with database.begin() as conn:  # the older one, late (another replica, an adopted session)
        write_messages(conn, [_report("d1", 100.0, "probation")])
    with database.connect() as conn:
        reported_at = conn.execute(select(devices.c.reported_at)).scalar_one()
        phase = conn.execute(select(device_streams.c.phase)).scalar_one()
    assert (reported_at, phase) == (200.0, "committed")
    with database.begin() as conn:  # a newer one still goes through
        write_messages(conn, [_report("d1", 300.0, "idle")])
    with database.connect() as conn:
        assert conn.execute(select(device_streams.c.phase)).scalar_one() == "idle"


def test_writers_naming_the_same_devices_in_opposite_orders_do_not_deadlock(
    database: Database,
) -> None:
    ids = [f"d{i:03d}" for i in range(200)]
    with database.begin() as conn:
        write_messages(conn, [_report(d, 1.0, "idle") for d in ids])
    errors: list[BaseException] = []

    def writer(order: list[str], offset: float) -> None:
        try:
            for round_ in range(5):
                ts = 10.0 + round_ * 2 + offset
                with database.begin() as conn:  # as the ingestor does: devices known
                    batch = collect([_report(d, ts, "shadow") for d in order])
                    write_batch(conn, batch, known=set(ids), touch=None)  # under load
                    time.sleep(0.01)  # hold the locks a moment: overlap the other writer
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=writer, args=(ids, 0.0)),
        threading.Thread(target=writer, args=(ids[::-1], 1.0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with database.connect() as conn:
        assert set(conn.execute(select(devices.c.reported_at)).scalars()) == {19.0}
