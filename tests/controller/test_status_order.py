"""A device's statuses are kept in the order the agent made them, whatever order controller
replicas commit them in (SQLite and PostgreSQL).

With several replicas in one shared group, two statuses of a device can go to different
replicas and be committed out of order: the older one then stood until the device's next
status, which comes with its next change, not on a timer (docs/scaling.md). A status now
carries ``seq`` (``protocol.Status.seq``): of two statuses of one agent process
(``started_at``), the higher ``seq`` is the newer, the last will of a connection included,
although its ``ts`` is the time that connection was made."""

from __future__ import annotations

from sqlalchemy import select

from controller.db.models import devices
from controller.db.session import Database
from controller.fleet.devices import get_device
from controller.fleet.writes import Received, write_messages
from protocol import Status, StreamStatus
from protocol.messages import status_seq, will_seq

STARTED = 1_800_000_000.0


def _status(
    state: str,
    seq: int | None,
    *,
    source: str = "running",
    ts: float = STARTED + 10,
    started_at: float = STARTED,
) -> Status:
    return Status(
        schema=1,
        device_id="dev-01",
        state=state,  # type: ignore[arg-type]
        ts=ts,
        agent_version="1.0",
        started_at=started_at,
        streams=[]
        if state == "offline"
        else [StreamStatus(name="cam0", source_state=source, model="m@1")],  # type: ignore[arg-type]
        seq=seq,
    )


def _write(db: Database, *statuses: Status) -> None:
    """Each status in its own batch and transaction: as replicas commit them."""
    for s in statuses:
        with db.begin() as conn:
            write_messages(
                conn, [Received(topic="t", device_id="dev-01", message=s, received_at=s.ts)]
            )


def _stored(db: Database) -> tuple[str | None, str | None, int]:
    """(state, the stream's source state, state_seq)."""
    with db.connect() as conn:
        device = get_device(conn, "dev-01")
        counted = conn.execute(select(devices.c.state_seq)).scalar_one()
    assert device is not None
    source = device.streams[0].source_state if device.streams else None
    return device.state, source, int(counted)


def test_an_older_status_of_the_same_process_committed_later_is_not_written(
    database: Database,
) -> None:
    newer = _status("online", status_seq(1, 3), source="failed", ts=STARTED + 12)
    older = _status("online", status_seq(1, 2), source="running", ts=STARTED + 11)
    _write(database, newer, older)
    assert _stored(database) == ("online", "failed", 1)  # not counted either


def test_the_will_of_a_connection_is_newer_than_its_statuses_but_older_than_the_next(
    database: Database,
) -> None:
    """The will's ``ts`` is when connection 1 was made, before every status on it."""
    _write(database, _status("online", status_seq(1, 1), ts=STARTED + 1))
    will = _status("offline", will_seq(1), ts=STARTED + 0.5)
    _write(database, will)
    assert _stored(database)[0] == "offline"
    late = _status("online", status_seq(1, 2), source="failed", ts=STARTED + 20)
    _write(database, late)  # sent before the link dropped, committed after the will
    assert _stored(database)[:2] == ("offline", "running")
    back = _status("online", status_seq(2, 3), ts=STARTED + 30)
    _write(database, back)
    assert _stored(database)[:2] == ("online", "running")
    _write(database, will)  # the broker's redelivery of the old will
    assert _stored(database)[0] == "online"


def test_another_process_and_older_agents_are_written_as_they_come(database: Database) -> None:
    _write(database, _status("online", status_seq(5, 40), source="failed"))
    restarted = _status("online", status_seq(1, 1), started_at=STARTED + 100, ts=STARTED + 101)
    _write(database, restarted)  # a lower seq, but a new process: its own order
    assert _stored(database)[:2] == ("online", "running")
    old_agent = _status("online", None, source="failed", started_at=STARTED + 100)
    _write(database, old_agent)  # no seq: arrival order, as before
    assert _stored(database) == ("online", "failed", 3)
    _write(database, _status("online", status_seq(1, 0), started_at=STARTED + 100))
    assert _stored(database)[:2] == ("online", "running")  # after one without seq


def test_statuses_of_many_devices_in_one_batch_are_each_judged_on_their_own(
    database: Database,
) -> None:
    ids = [f"dev-{i:02d}" for i in range(6)]

    def status(device: str, seq: int, source: str) -> Received:
        msg = Status(
            schema=1,
            device_id=device,
            state="online",
            ts=STARTED + seq,
            agent_version="1.0",
            started_at=STARTED,
            streams=[StreamStatus(name="cam0", source_state=source, model="m@1")],  # type: ignore[arg-type]
            seq=seq,
        )
        return Received(topic="t", device_id=device, message=msg, received_at=STARTED)

    with database.begin() as conn:
        write_messages(conn, [status(d, status_seq(1, 5), "running") for d in ids])
    with database.begin() as conn:  # odd devices: newer; even devices: older
        write_messages(
            conn,
            [status(d, status_seq(1, 6 if i % 2 else 4), "failed") for i, d in enumerate(ids)],
        )
    with database.connect() as conn:
        sources = {}
        for d in ids:
            device = get_device(conn, d)
            assert device is not None
            sources[d] = device.streams[0].source_state
    assert sources == {d: "failed" if i % 2 else "running" for i, d in enumerate(ids)}
