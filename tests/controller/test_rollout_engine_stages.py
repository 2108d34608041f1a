"""The rollout engine on SQLite and PostgreSQL with a fake clock: creation and stages, bake,
idempotent and restart-safe ticks, revs, and the desired-state publisher. Abort criteria,
rollback and operator actions: tests/controller/test_rollout_engine_aborts.py."""

from __future__ import annotations

from typing import Any

import pytest

from controller.db.session import Database
from controller.errors import RolloutError
from controller.rollouts import commands, executions
from controller.rollouts.engine import RolloutEngine
from controller.rollouts.publisher import DesiredPublisher, desired_message
from controller.rollouts.records import list_rollouts
from protocol import Desired, decode
from tests.controller.conftest import Clock
from tests.controller.rollout_engine_support import ids, snapshot
from tests.controller.rollout_fleet import BASE_URL, Fleet

# --- creation -----------------------------------------------------------------------------


def test_create_resolves_the_selection_in_stable_stages(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*reversed(ids(10)))  # insertion order must not matter: stages go by device id
    r = fleet.create(stages="1,10%,50%,100%", bake_s=60)
    assert r.state == "active" and r.device_count == 10
    assert r.stages == [1, 5, 10]  # 10% of 10 is the canary again: that stage is dropped
    assert r.stage_spec == "1,10%,50%,100%"
    stages = {d: row.stage for (d, _), row in fleet.rows(r.id).items()}
    assert stages == {f"dev-{i:02d}": (0 if i == 0 else 1 if i < 5 else 2) for i in range(10)}
    assert set(fleet.statuses(r.id).values()) == {"pending"}
    assert fleet.desired("dev-00") is None  # nothing is written before the engine ticks


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"model": "m@9"},
            "no model m@9 in the registry; upload it first with `edgefleet model push",
        ),
        ({"model": "m"}, "is not MODEL@VERSION"),
        ({"select": ()}, "select devices with --select all"),
        ({"select": ("ghost",)}, "unknown device 'ghost'"),
        ({"select": ("tag=nowhere",)}, "matches no device"),
        ({"stream": "cam9"}, "matches no device that reports stream 'cam9'"),
        ({"select": ("dev-00",), "stream": "cam9"}, "device 'dev-00' reports no stream 'cam9'"),
        ({"stages": "1,50%"}, "the last stage must cover the whole selection"),
        ({"stages": "3,1,100%"}, "must not shrink"),
        ({"stages": "0,100%"}, "neither a device count"),
        ({"stages": "150%"}, "at most 100%"),
        ({"max_failures": 1.5}, "between 0% and 100%"),
        ({"timeout_s": 0}, "must be > 0"),
    ],
)
def test_create_refuses_bad_requests_saying_what_to_do(
    fleet: Fleet, kw: dict[str, Any], message: str
) -> None:
    fleet.model()
    fleet.add(*ids(3))
    with pytest.raises(RolloutError, match=message.replace("(", r"\(").replace("`", ".")):
        fleet.create(**kw)


def test_overlapping_rollout_is_refused_naming_the_active_one(fleet: Fleet) -> None:
    fleet.model()
    fleet.model(version="3")
    fleet.add(*ids(4), streams=("cam0", "cam1"), tags=("site:a",))
    first = fleet.create(select=("dev-01", "dev-02"), stream="cam0")
    with pytest.raises(RolloutError) as err:
        fleet.create(model="m@3", select=("tag=site:a",), stream="*")
    assert err.value.kind == "conflict"
    assert f"in rollout {first.id} (m@2, active)" in str(err.value)
    assert f"edgefleet rollout abort {first.id}" in str(err.value)
    # Another stream of the same devices is free; so are the pairs once the first ended.
    other = fleet.create(model="m@3", select=("dev-01", "dev-02"), stream="cam1")
    assert other.device_count == 2
    with fleet.db.begin() as conn:
        commands.abort(conn, first.id, now=fleet.clock())
    again = fleet.create(model="m@3", select=("dev-01",), stream="cam0")
    assert again.id > other.id
    with fleet.db.connect() as conn:
        assert [r.id for r in list_rollouts(conn)] == [again.id, other.id, first.id]


# --- running --------------------------------------------------------------------------------


def test_happy_path_through_stages_with_bake_times(fleet: Fleet) -> None:
    model = fleet.model()
    fleet.add(*ids(10))
    r = fleet.create(stages="1,50%,100%", bake_s=60, timeout_s=300)
    report = fleet.tick()
    assert report.assigned == 1 and report.desired_written == 1
    desired = fleet.desired("dev-00")
    assert desired is not None and desired.rev == 1 and not desired.published
    assert desired.rollout_id == r.id
    assert desired.models == {
        "cam0": {
            "name": "m",
            "version": "2",
            "url": f"{BASE_URL}/api/v1/models/m/2/bundle?key={model.download_key}",
            "sha256": model.sha256,
            "size": 1234,
            "signature": "c2ln",
        }
    }
    assert fleet.statuses(r.id)["dev-00/cam0"] == "queued"
    assert fleet.desired("dev-01") is None
    fleet.take_up("dev-00")
    fleet.tick(1)
    assert fleet.statuses(r.id)["dev-00/cam0"] == "in_progress"
    assert fleet.rows(r.id)[("dev-00", "cam0")].phase == "downloading"
    fleet.act()
    fleet.tick(1)
    row = fleet.rows(r.id)[("dev-00", "cam0")]
    assert row.status == "succeeded" and row.finished_at == fleet.clock()
    assert row.previous_model is None  # it ran its baseline
    assert fleet.rollout(r.id).stage_done_at == fleet.clock()
    fleet.tick(59)
    assert fleet.desired("dev-01") is None, "stage 2 started before the bake ended"
    fleet.tick(1)
    assert fleet.rollout(r.id).current_stage == 1
    assert [fleet.desired_model(d) for d in ids(10)] == ["m@2"] * 5 + [None] * 5
    fleet.act()
    fleet.tick(1)
    fleet.tick(60)
    fleet.act()
    fleet.tick(1)
    assert fleet.rollout(r.id).state == "active"  # the last stage bakes too
    fleet.tick(60)
    done = fleet.rollout(r.id)
    assert done.state == "completed" and done.finished_at == fleet.clock()
    assert set(fleet.statuses(r.id).values()) == {"succeeded"}
    assert all(fleet.active[(d, "cam0")] == "m@2" for d in ids(10))
    assert all(row.rev == 1 for row in fleet.rows(r.id).values())  # one rev per device
    with fleet.db.connect() as conn:
        view = commands.detail(conn, r.id, now=fleet.clock())
    assert [(s.devices, s.size, s.state) for s in view.stages] == [
        (1, 1, "done"),
        (5, 4, "done"),
        (10, 5, "done"),
    ]
    assert view.counts == {"succeeded": 10}


def test_ticks_are_idempotent_and_a_new_engine_continues_where_the_old_one_stopped(
    fleet: Fleet, database: Database, clock: Clock
) -> None:
    fleet.model()
    fleet.add(*ids(6))
    r = fleet.create(stages="1,100%", bake_s=5)
    for _ in range(16):
        fleet.tick(1)
        before = snapshot(database)
        fleet.engine.tick()  # same now: nothing changes
        assert snapshot(database) == before
        # A restart: a brand-new engine (no memory) at the same instant changes nothing either.
        assert RolloutEngine(database, base_url=lambda: BASE_URL, clock=clock).tick().assigned == 0
        assert snapshot(database) == before
        fleet.act()
    assert fleet.rollout(r.id).state == "completed"
    assert all(row.rev == 1 for row in fleet.rows(r.id).values())


def test_a_crash_inside_a_tick_leaves_nothing_half_done(
    fleet: Fleet, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.model()
    fleet.add(*ids(4))
    r = fleet.create(stages="2,100%", bake_s=0)
    real = executions.mark_assigned

    def crash(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        raise RuntimeError("power cut after the desired states were written")

    monkeypatch.setattr(executions, "mark_assigned", crash)
    assert fleet.engine.tick().errors == 1
    assert fleet.desired("dev-00") is None  # rolled back with the transaction
    assert set(fleet.statuses(r.id).values()) == {"pending"}
    monkeypatch.setattr(executions, "mark_assigned", real)
    fleet.run(r.id)
    assert all(row.rev == 1 for row in fleet.rows(r.id).values())


def test_revs_continue_above_what_the_device_reported(fleet: Fleet) -> None:
    fleet.model()
    fleet.add("dev-00", reported_rev=41)  # e.g. a controller whose database was replaced
    r = fleet.create(stages="100%")
    fleet.tick()
    desired = fleet.desired("dev-00")
    assert desired is not None and desired.rev == 42
    assert fleet.rows(r.id)[("dev-00", "cam0")].rev == 42


def test_every_stream_of_a_device_gets_one_rev(fleet: Fleet) -> None:
    fleet.model()
    fleet.add("dev-00", "dev-01", streams=("cam0", "cam1"))
    fleet.add("dev-02", streams=("door",))
    r = fleet.create(stream="*", stages="1,100%", bake_s=0)
    assert r.device_count == 3
    assert sorted(fleet.statuses(r.id)) == [
        "dev-00/cam0",
        "dev-00/cam1",
        "dev-01/cam0",
        "dev-01/cam1",
        "dev-02/door",
    ]
    fleet.run(r.id)
    desired = fleet.desired("dev-00")
    assert desired is not None and sorted(desired.models) == ["cam0", "cam1"] and desired.rev == 1
    assert fleet.active[("dev-02", "door")] == "m@2"


# --- publishing -------------------------------------------------------------------------------


def test_publisher_marks_only_acknowledged_revs_and_republishes_the_rest(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(3))
    fleet.create(stages="100%")
    fleet.tick()
    sent: list[tuple[str, bytes]] = []
    answers = [True, False, True]

    def publish(messages: Any) -> list[bool]:
        sent.extend(messages)
        return [answers.pop(0) if answers else True for _ in messages]

    publisher = DesiredPublisher(fleet.db, publish=publish, clock=fleet.clock)
    assert publisher.publish_pending() == 2
    assert [t for t, _ in sent] == [f"edgefleet/v1/dev-0{i}/desired" for i in range(3)]
    msg = decode(sent[0][1], Desired)
    assert msg.rev == 1 and msg.rollout_id == "1" and msg.models["cam0"].version == "2"
    assert [fleet.desired(d).published for d in ids(3)] == [True, False, True]  # type: ignore[union-attr]
    # A restart: a new publisher finds the unacknowledged one and publishes it again.
    sent.clear()
    assert DesiredPublisher(fleet.db, publish=publish, clock=fleet.clock).publish_pending() == 1
    assert [t for t, _ in sent] == ["edgefleet/v1/dev-01/desired"]
    assert publisher.publish_pending() == 0
    assert publisher.republish_all() == 3
    assert publisher.publish_pending() == 3


def test_a_rev_written_while_publishing_stays_unpublished(fleet: Fleet) -> None:
    fleet.model()
    fleet.add("dev-00")
    r = fleet.create(stages="100%")
    fleet.tick()

    def publish(messages: Any) -> list[bool]:
        with fleet.db.begin() as conn:  # the operator aborts while the message is in flight
            commands.abort(conn, r.id, now=fleet.clock())
        fleet.tick(1)
        return [True for _ in messages]

    DesiredPublisher(fleet.db, publish=publish, clock=fleet.clock).publish_pending()
    row = fleet.desired("dev-00")
    assert row is not None and row.rev == 2 and not row.published
    assert desired_message(row).models == {}


def test_a_failure_reported_before_the_assignment_is_not_taken_for_this_rollouts_outcome(
    fleet: Fleet,
) -> None:
    """The agent publishes the new desired_rev before the stream's phase changes: a stream
    whose last deployment of this same model failed still shows that failure for a moment."""
    fleet.model()
    fleet.add(*ids(3), reported_rev=3)
    earlier = {
        "dev-00": "download_failed",  # the agent retries this one
        "dev-01": "golden_mismatch",  # ... and not this one: the same bytes fail the same way
        "dev-02": "download_failed",
    }
    for d, reason in earlier.items():
        fleet.publish_report(d, {"cam0": ("failed", "m@2", reason)})
    r = fleet.create(stages="100%", timeout_s=30, max_failures=1.0)
    fleet.tick()
    assert fleet.desired("dev-00").rev == 4  # type: ignore[union-attr]
    for d, reason in earlier.items():  # rev 4 taken up, phases not changed yet
        fleet.handled[d] = 4
        fleet.publish_report(d, {"cam0": ("failed", "m@2", reason)})
    fleet.tick(1)
    assert set(fleet.statuses(r.id).values()) == {"in_progress"}
    fleet.publish_report("dev-00", {"cam0": ("downloading", "m@2", None)})
    fleet.publish_report("dev-02", {"cam0": ("failed", "m@2", "sha256_mismatch")})
    fleet.tick(1)
    fleet.active[("dev-00", "cam0")] = "m@2"
    fleet.publish_report("dev-00", {"cam0": ("committed", "m@2", None)})
    fleet.tick(1)
    rows = fleet.rows(r.id)
    assert rows[("dev-00", "cam0")].status == "succeeded"
    assert (rows[("dev-02", "cam0")].status, rows[("dev-02", "cam0")].reason) == (
        "failed",
        "sha256_mismatch",
    )
    assert rows[("dev-01", "cam0")].status == "in_progress"
    fleet.tick(30)
    row = fleet.rows(r.id)[("dev-01", "cam0")]
    assert row.status == "timed_out"
    assert row.reason == (
        "timeout: the device still reports its earlier failed of this model (golden_mismatch) "
        "and did not deploy it again within 30s"
    )
