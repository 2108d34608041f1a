"""One device's data never stops a rollout (SQLite and PostgreSQL): a forged reported rev,
a desired-state write the database refuses, a malformed stored or reported state, and
malformed telemetry each fail only that device's execution (reason ``code: message``), and
the rollout goes on by its failure budget."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert, text, update

from controller.db.models import device_desired, device_streams, devices, telemetry
from controller.db.session import Database
from controller.rollouts import commands, desired
from controller.rollouts.faults import (
    DESIRED_WRITE_FAILED,
    MALFORMED_STATE,
    REV_OUT_OF_RANGE,
    DeviceFault,
    fault_code,
    next_rev,
)
from controller.rollouts.publisher import DesiredPublisher
from protocol import Desired, decode
from protocol.limits import MAX_SAFE_INT, MAX_STREAMS
from tests.controller.conftest import Clock
from tests.controller.rollout_fleet import Fleet

FORGED_REV = 9223372036854775807  # 2^63 - 1: what the outside testers' device reported


@pytest.fixture
def fleet(database: Database, clock: Clock) -> Fleet:
    return Fleet(database, clock)


def ids(n: int) -> list[str]:
    return [f"dev-{i:02d}" for i in range(n)]


def _report_rev(db: Database, device_id: str, rev: int) -> None:
    """What ingesting the device's retained ``reported`` message left in the database."""
    with db.begin() as conn:
        conn.execute(update(devices).where(devices.c.id == device_id).values(desired_rev=rev))


def _refuse_desired_writes(db: Database, device_id: str) -> None:
    """A database trigger that refuses every desired-state write of one device."""
    with db.begin() as conn:
        if db.dialect == "sqlite":
            for op in ("INSERT", "UPDATE"):
                conn.execute(
                    text(
                        f"CREATE TRIGGER refuse_{op.lower()} BEFORE {op} ON device_desired "
                        f"WHEN NEW.device_id = '{device_id}' "
                        "BEGIN SELECT RAISE(ABORT, 'injected fault: storage refused'); END"
                    )
                )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_desired() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.device_id = '{device_id}' THEN "
                    "RAISE EXCEPTION 'injected fault: storage refused'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_desired BEFORE INSERT OR UPDATE ON device_desired "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_desired()"
                )
            )


def _failed_alone(fleet: Fleet, rollout_id: int, bad: str, code: str) -> str:
    """The bad device's execution failed with ``code``; every other one succeeded. Returns
    the reason."""
    rows = fleet.rows(rollout_id)
    row = rows[(bad, "cam0")]
    assert row.status == "failed", row
    assert row.reason is not None and fault_code(row.reason) == code, row.reason
    assert row.rev is None and row.finished_at is not None
    others = {d: r.status for (d, _), r in rows.items() if d != bad}
    assert set(others.values()) == {"succeeded"}, others
    return row.reason


def test_a_forged_reported_rev_fails_only_that_device_and_the_rollout_completes(
    fleet: Fleet,
) -> None:
    fleet.model()
    fleet.add(*ids(6))
    _report_rev(fleet.db, "dev-03", FORGED_REV)
    r = fleet.create(stages="1,100%", bake_s=0, max_failures=0.25)
    done = fleet.run(r.id)  # every tick must succeed (Fleet.tick asserts no tick error)
    assert done.state == "completed", done
    reason = _failed_alone(fleet, r.id, "dev-03", REV_OUT_OF_RANGE)
    assert str(FORGED_REV) in reason and str(MAX_SAFE_INT) in reason
    assert "check the device" in reason
    assert fleet.desired("dev-03") is None  # nothing was written for it
    assert [fleet.desired_model(d) for d in ids(6) if d != "dev-03"] == ["m@2"] * 5


def test_a_forged_rev_in_the_canary_aborts_by_the_budget_instead_of_stalling(
    fleet: Fleet,
) -> None:
    fleet.model()
    fleet.add(*ids(4))
    _report_rev(fleet.db, "dev-00", FORGED_REV)
    r = fleet.create(stages="1,100%", bake_s=0)  # default budget: 5%
    done = fleet.run(r.id)
    assert done.state == "aborted" and done.reason == "stage_failed", done
    assert done.detail is not None and "dev-00/cam0: rev_out_of_range" in done.detail
    assert fleet.statuses(r.id) == {
        "dev-00/cam0": "failed",
        **{f"{d}/cam0": "pending" for d in ids(4)[1:]},
    }
    assert done.rolled_back_at is not None


def test_revs_stay_json_safe_up_to_the_last_one(fleet: Fleet) -> None:
    """A device that reported 2^53-2 gets 2^53-1 (published as exact JSON); one that
    reported 2^53-1 would need 2^53: its execution fails instead."""
    fleet.model()
    fleet.add("dev-00", "dev-01", "dev-02")
    _report_rev(fleet.db, "dev-00", MAX_SAFE_INT - 1)
    _report_rev(fleet.db, "dev-01", MAX_SAFE_INT)
    r = fleet.create(stages="100%", bake_s=0, max_failures=0.5)
    fleet.tick()
    last = fleet.desired("dev-00")
    assert last is not None and last.rev == MAX_SAFE_INT
    assert fleet.rows(r.id)[("dev-00", "cam0")].rev == MAX_SAFE_INT
    row = fleet.rows(r.id)[("dev-01", "cam0")]
    assert row.status == "failed" and fault_code(row.reason) == REV_OUT_OF_RANGE
    assert f"would be {MAX_SAFE_INT + 1}" in (row.reason or "")
    published: list[tuple[str, bytes]] = []

    def publish(messages: Any) -> list[bool]:
        published.extend(messages)
        return [True] * len(messages)

    DesiredPublisher(fleet.db, publish=publish, clock=fleet.clock).publish_pending()
    revs = {t: decode(p, Desired).rev for t, p in published}
    assert revs == {"edgefleet/v1/dev-00/desired": MAX_SAFE_INT, "edgefleet/v1/dev-02/desired": 1}


def test_a_desired_write_the_database_refuses_fails_only_that_device(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(5))
    _refuse_desired_writes(fleet.db, "dev-02")
    r = fleet.create(stages="1,100%", bake_s=0, max_failures=0.25)
    done = fleet.run(r.id)
    assert done.state == "completed", done
    reason = _failed_alone(fleet, r.id, "dev-02", DESIRED_WRITE_FAILED)
    assert "injected fault: storage refused" in reason and "dev-02" in reason
    assert fleet.desired("dev-02") is None


def test_a_desired_write_failing_in_the_driver_for_one_device_fails_only_it(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault injected on purpose: the driver cannot bind one device's row."""
    real = desired.upsert_desired

    def flaky(conn: Any, rows: Any) -> None:
        if any(row["device_id"] == "dev-01" for row in rows):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        real(conn, rows)

    monkeypatch.setattr(desired, "upsert_desired", flaky)
    fleet.model()
    fleet.add(*ids(4))
    r = fleet.create(stages="100%", bake_s=0, max_failures=0.25)
    assert fleet.run(r.id).state == "completed"
    assert "int too large" in _failed_alone(fleet, r.id, "dev-01", DESIRED_WRITE_FAILED)


def test_a_rollback_write_refused_for_one_device_still_rolls_back_the_others(
    fleet: Fleet,
) -> None:
    fleet.model()
    fleet.add(*ids(4))
    r = fleet.create(stages="100%", bake_s=600)
    fleet.tick()
    fleet.act()
    fleet.tick(1)
    assert set(fleet.statuses(r.id).values()) == {"succeeded"}
    _refuse_desired_writes(fleet.db, "dev-01")
    with fleet.db.begin() as conn:
        commands.abort(conn, r.id, now=fleet.clock())
    fleet.tick(1)
    done = fleet.rollout(r.id)
    assert done.rolled_back_at is not None, "the rollback never finished"
    rows = fleet.rows(r.id)
    assert rows[("dev-01", "cam0")].status == "succeeded"
    assert (rows[("dev-01", "cam0")].reason or "").startswith(
        "not rolled back: desired_write_failed: the database refused device dev-01"
    )
    assert fleet.desired_model("dev-01") == "m@2"
    for d in ("dev-00", "dev-02", "dev-03"):
        assert rows[(d, "cam0")].status == "rolled_back"
        assert fleet.desired_model(d) is None  # back to the baseline


def test_a_malformed_stored_desired_state_fails_that_device_and_publishing_goes_on(
    fleet: Fleet,
) -> None:
    fleet.model()
    fleet.add(*ids(5))
    with fleet.db.begin() as conn:
        conn.execute(
            insert(device_desired).values(
                device_id="dev-01",
                rev=3,
                models="not an object",
                published=False,
                updated_at=fleet.clock() - 100,  # first in the publisher's order
            )
        )
    r = fleet.create(stages="100%", bake_s=0, max_failures=0.25)
    fleet.tick()
    row = fleet.rows(r.id)[("dev-01", "cam0")]
    assert row.status == "failed" and fault_code(row.reason) == MALFORMED_STATE
    assert "'not an object'" in (row.reason or "")
    published: list[str] = []

    def publish(messages: Any) -> list[bool]:
        published.extend(t for t, _ in messages)
        return [True] * len(messages)

    publisher = DesiredPublisher(fleet.db, publish=publish, clock=fleet.clock, batch_size=2)
    assert publisher.publish_pending() == 4
    assert sorted(published) == [f"edgefleet/v1/{d}/desired" for d in ids(5) if d != "dev-01"]
    assert publisher.publish_pending() == 0  # the malformed row does not loop or block
    for _ in range(3):
        fleet.act(devices=[d for d in ids(5) if d != "dev-01"])
        fleet.tick(1)
    assert fleet.rollout(r.id).state == "completed"


def test_a_malformed_reported_state_fails_that_device_when_watched(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(5))
    r = fleet.create(stages="100%", bake_s=0, max_failures=0.25)
    fleet.tick()
    with fleet.db.begin() as conn:
        conn.execute(
            update(device_streams).where(device_streams.c.device_id == "dev-04").values(gate=[1, 2])
        )
    fleet.tick(1)
    row = fleet.rows(r.id)[("dev-04", "cam0")]
    assert row.status == "failed", row
    assert (row.reason or "").startswith(
        "malformed_state: device dev-04's reported gate evidence for stream 'cam0' is [1, 2]"
    )
    fleet.act()
    assert fleet.run(r.id).state == "completed"


def test_malformed_telemetry_of_one_device_does_not_stop_the_health_check(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(4))
    r = fleet.create(stages="1,100%", bake_s=30)
    fleet.tick()
    fleet.act()
    fleet.tick(1)
    assert fleet.statuses(r.id)["dev-00/cam0"] == "succeeded"
    with fleet.db.begin() as conn:
        for streams in (5, ["garbage", {"name": "cam0", "fps": "fast", "errors": None}]):
            conn.execute(
                insert(telemetry).values(
                    device_id="dev-02",
                    ts=fleet.clock(),
                    interval_s=10.0,
                    cpu_percent=1.0,
                    mem_percent=1.0,
                    mem_used_bytes=1,
                    disk_percent=1.0,
                    disk_free_bytes=1,
                    spool_depth=0,
                    spool_dropped=0,
                    streams=streams,
                )
            )
    assert fleet.run(r.id).state == "completed"


@pytest.mark.parametrize(
    ("last", "reported", "rev"),
    [(None, None, 1), (4, None, 5), (None, 41, 42), (7, 3, 8), (None, -5, 1)],
)
def test_next_rev_is_one_above_both(last: int | None, reported: int | None, rev: int) -> None:
    assert next_rev("d", last, reported) == rev


@pytest.mark.parametrize(
    ("last", "reported", "code", "words"),
    [
        (MAX_SAFE_INT, None, REV_OUT_OF_RANGE, "its stored desired rev is already"),
        (None, FORGED_REV, REV_OUT_OF_RANGE, f"it reported desired_rev {FORGED_REV}"),
        (None, "garbage", MALFORMED_STATE, "reported desired_rev is 'garbage', not an integer"),
        (2.5, None, MALFORMED_STATE, "stored desired rev is 2.5, not an integer"),
        (None, True, MALFORMED_STATE, "not an integer"),
    ],
)
def test_next_rev_refuses_what_is_not_a_json_safe_integer(
    last: object, reported: object, code: str, words: str
) -> None:
    with pytest.raises(DeviceFault) as err:
        next_rev("cam-9", last, reported)
    assert err.value.code == code
    assert err.value.reason.startswith(f"{code}: ") and words in err.value.reason


def test_a_stored_desired_state_outside_the_protocol_is_not_published(fleet: Fleet) -> None:
    """Each model entry converts, but together they break a protocol bound (more streams than
    a device may have): the checked encode refuses it and the other devices still get theirs."""
    fleet.model()
    fleet.add(*ids(3))
    ref = {"name": "m", "version": "2", "url": "http://c/m.efb", "sha256": "a" * 64, "size": 1}
    with fleet.db.begin() as conn:
        for device_id, count in (("dev-00", 1), ("dev-01", MAX_STREAMS + 1), ("dev-02", 1)):
            conn.execute(
                insert(device_desired).values(
                    device_id=device_id,
                    rev=1,
                    models={f"s{i}": ref for i in range(count)},
                    published=False,
                    updated_at=fleet.clock(),
                )
            )
    published: list[str] = []

    def publish(messages: Any) -> list[bool]:
        published.extend(t for t, _ in messages)
        return [True] * len(messages)

    publisher = DesiredPublisher(fleet.db, publish=publish, clock=fleet.clock)
    assert publisher.publish_pending() == 2
    assert sorted(published) == ["edgefleet/v1/dev-00/desired", "edgefleet/v1/dev-02/desired"]
