"""The rollout engine on SQLite and PostgreSQL with a fake clock: abort criteria (failure
share, timeouts, the canary's health), automatic rollback, and pause/resume/abort/rollback
by an operator. Creation, stages and publishing: tests/controller/test_rollout_engine_stages.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.db.session import Database
from controller.errors import RolloutError
from controller.rollouts import commands
from controller.rollouts.health import HealthPolicy
from tests.controller.conftest import Clock
from tests.controller.rollout_engine_support import ids, snapshot
from tests.controller.rollout_fleet import BASELINE, Fleet

# --- abort criteria and rollback -------------------------------------------------------------


def test_a_failing_canary_aborts_below_min_executed_and_is_rolled_back(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(20))
    r = fleet.create(stages="1,10%,100%", min_executed=5, max_failures=0.05, bake_s=60)
    done = fleet.run(r.id, fail={"m@2": "golden_mismatch"})
    assert done.state == "aborted" and done.reason == "stage_failed"
    assert done.detail is not None
    assert "stage 1: 1 of 1 executions failed (100%)" in done.detail
    assert "dev-00/cam0: golden_mismatch" in done.detail
    canary = fleet.rows(r.id)[("dev-00", "cam0")]
    assert canary.status == "rolled_back" and canary.reason == "golden_mismatch"
    assert canary.rev == 1 and canary.rollback_rev == 2
    desired = fleet.desired("dev-00")
    assert desired is not None and desired.rev == 2 and desired.models == {}  # baseline
    assert [fleet.desired(d) for d in ids(20)[1:]] == [None] * 19  # nobody else was touched
    assert fleet.active[("dev-00", "cam0")] == BASELINE


def test_failure_share_over_the_limit_after_min_executed_aborts_mid_stage(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(10))
    r = fleet.create(stages="1,100%", min_executed=3, max_failures=0.2, bake_s=0, timeout_s=100)
    fleet.tick()
    fleet.act()
    fleet.tick(1)
    fleet.tick(1)  # stage 2 assigned
    assert fleet.rollout(r.id).current_stage == 1
    fleet.act(fail={"m@2": "load_failed"}, devices=["dev-01", "dev-02"])
    fleet.act(devices=["dev-03"])
    for d in ids(10)[4:]:
        fleet.take_up(d)
    fleet.tick(1)
    done = fleet.rollout(r.id)
    assert done.state == "aborted" and done.reason == "failure_threshold"
    assert "2 of 4 finished executions failed (50%), above --max-failures 20%" in (
        done.detail or ""
    )
    # Everything touched goes back, including devices that succeeded or were still working.
    statuses = fleet.statuses(r.id)
    assert set(statuses.values()) == {"rolled_back"}
    assert all(fleet.desired_model(d) is None for d in ids(10))


def test_failures_at_or_below_the_limit_do_not_abort(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(10))
    r = fleet.create(stages="5,100%", min_executed=1, max_failures=0.2, bake_s=0)
    fleet.tick()
    fleet.act(fail={"m@2": "nan_output"}, devices=["dev-00"])
    fleet.act()
    done = fleet.run(r.id)
    assert done.state == "completed"
    assert fleet.statuses(r.id)["dev-00/cam0"] == "failed"
    assert list(fleet.statuses(r.id).values()).count("succeeded") == 9


def test_a_device_that_never_answers_times_out_and_counts_as_a_failure(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(3))
    r = fleet.create(stages="1,100%", timeout_s=30, bake_s=0, max_failures=0.5, min_executed=1)
    fleet.tick()
    fleet.tick(29)
    assert fleet.statuses(r.id)["dev-00/cam0"] == "queued"
    fleet.tick(1)
    row = fleet.rows(r.id)[("dev-00", "cam0")]
    done = fleet.rollout(r.id)
    assert done.state == "aborted" and done.reason == "stage_failed"
    assert "dev-00/cam0: timeout: never took up" in (done.detail or "")
    # Rolled back at once (its desired state goes back to the baseline); the reason stays.
    assert row.status == "rolled_back"
    assert row.reason == "timeout: never took up the desired state after 30s"


def test_a_device_stuck_in_a_phase_times_out_naming_it(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(2))
    r = fleet.create(stages="100%", timeout_s=10, max_failures=1.0)
    fleet.tick()
    fleet.take_up("dev-00", phase="staging")
    fleet.act(devices=["dev-01"])
    fleet.tick(10)
    row = fleet.rows(r.id)[("dev-00", "cam0")]
    assert row.status == "timed_out" and row.reason == "timeout: still staging after 10s"
    fleet.tick(600)
    assert fleet.rollout(r.id).state == "completed"  # 100% failures tolerated on purpose


def test_rollback_restores_the_previous_model_not_the_baseline(fleet: Fleet) -> None:
    fleet.model(version="2")
    fleet.model(version="3")
    fleet.add(*ids(3))
    first = fleet.run(fleet.create(model="m@2", stages="100%", bake_s=0).id)
    assert first.state == "completed"
    m2 = fleet.desired("dev-00")
    assert m2 is not None
    second = fleet.create(model="m@3", stages="1,100%", bake_s=0)
    done = fleet.run(second.id, fail={"m@3": "over_latency_budget"})
    assert done.state == "aborted"
    canary = fleet.rows(second.id)[("dev-00", "cam0")]
    assert canary.previous_model == "m@2"
    restored = fleet.desired("dev-00")
    assert restored is not None and restored.models == m2.models and restored.rev == m2.rev + 2
    assert fleet.active[("dev-00", "cam0")] == "m@2"


def _health_fleet(database: Database, clock: Clock, n: int = 10) -> Fleet:
    fleet = Fleet(database, clock, health=HealthPolicy(every_s=0))
    fleet.model()
    fleet.add(*ids(n))
    return fleet


def _rounds(
    fleet: Fleet, n: int, every: dict[str, Any], canary: dict[str, Any] | None = None
) -> None:
    """``n`` telemetry rounds 10 s apart: every device sends ``every``, dev-00 ``canary``."""
    for _ in range(n):
        fleet.clock.advance(10)
        for d in fleet.streams:
            fleet.telemetry(d, **(canary if canary is not None and d == "dev-00" else every))


def _canary_updated(database: Database, clock: Clock, n: int = 10) -> tuple[Fleet, int]:
    """A fleet of ``n`` (health judged at every tick), five rounds at 1.6 ms everywhere, then a
    ``1,100%`` rollout whose canary succeeded: the fleet and the rollout's id."""
    fleet = _health_fleet(database, clock, n)
    _rounds(fleet, 5, {"infer_ms_p95": 1.6})
    r = fleet.create(stages="1,100%", bake_s=120)
    fleet.tick(1)
    fleet.act()
    fleet.tick(1)
    assert fleet.statuses(r.id)["dev-00/cam0"] == "succeeded"
    return fleet, r.id


def test_a_fleet_wide_spike_right_after_the_canary_swap_does_not_abort(
    database: Database, clock: Clock
) -> None:
    """The incident: a machine-wide CPU spike hit every device at once right after the swap;
    the canary was judged on its samples since the swap, the others over 300 s."""
    fleet, rid = _canary_updated(database, clock)
    _rounds(fleet, 3, {"infer_ms_p95": 6.4})
    fleet.tick(1)
    assert fleet.rollout(rid).state == "active"
    fleet.tick(120)  # the bake is over: the check before the advance passes as well
    assert fleet.rollout(rid).current_stage == 1
    assert fleet.run(rid).state == "completed"


def test_health_regression_of_the_canary_aborts_with_reason_health_regression(
    database: Database, clock: Clock
) -> None:
    fleet, rid = _canary_updated(database, clock)
    _rounds(fleet, 3, {"infer_ms_p95": 1.6}, canary={"infer_ms_p95": 5.0})
    fleet.tick(1)
    done = fleet.rollout(rid)
    assert done.state == "aborted" and done.reason == "health_regression"
    assert done.detail == (
        "canary inference p95 rose 3.1x after the update (1.6 -> 5.0 ms) while the 9 devices "
        "not updated changed 1.0x over the same window"
    )
    assert fleet.desired_model("dev-00") is None


def test_a_canary_with_only_two_samples_since_the_swap_waits_instead_of_aborting(
    database: Database, clock: Clock
) -> None:
    fleet, rid = _canary_updated(database, clock)
    _rounds(fleet, 2, {"infer_ms_p95": 1.6}, canary={"infer_ms_p95": 5.0})
    fleet.tick(1)
    assert fleet.rollout(rid).state == "active"
    _rounds(fleet, 1, {"infer_ms_p95": 1.6}, canary={"infer_ms_p95": 5.0})
    fleet.tick(1)
    assert fleet.rollout(rid).reason == "health_regression"


def test_a_canary_without_telemetry_from_before_the_update_is_not_judged(
    database: Database, clock: Clock
) -> None:
    fleet = _health_fleet(database, clock)
    r = fleet.create(stages="1,100%", bake_s=30)
    fleet.tick(1)
    fleet.act()
    fleet.tick(1)
    _rounds(fleet, 3, {"infer_ms_p95": 1.6}, canary={"infer_ms_p95": 9.0})
    fleet.tick(1)
    assert fleet.rollout(r.id).state == "active"  # not enough evidence: no abort
    assert fleet.run(r.id).state == "completed"


@pytest.mark.parametrize("what", ["fps", "errors"])
def test_equal_health_does_not_abort_and_an_fps_drop_or_errors_only_on_the_canary_do(
    database: Database, clock: Clock, what: str
) -> None:
    fleet, rid = _canary_updated(database, clock, n=6)
    _rounds(fleet, 3, {"infer_ms_p95": 1.6}, canary={"infer_ms_p95": 1.7})
    fleet.tick(1)
    assert fleet.rollout(rid).state == "active"
    for i in range(1, 5):  # most of the canary's samples since its swap
        canary = {"fps": 10} if what == "fps" else {"errors": 50 * i}
        _rounds(fleet, 1, {"infer_ms_p95": 1.6}, canary={"infer_ms_p95": 1.6, **canary})
    fleet.tick(1)
    done = fleet.rollout(rid)
    assert done.reason == "health_regression"
    assert done.detail == (
        "canary fps fell to 0.40x after the update (25.0 -> 10.0 fps) while the 5 devices "
        "not updated changed 1.00x over the same window"
        if what == "fps"
        else "canary errors rose from 0.0% to 11.8% of frames after the update while the 5 "
        "devices not updated changed +0.0 points over the same window"
    )


# --- operator actions ---------------------------------------------------------------------------


def test_pause_stops_advancing_and_resume_continues(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(4))
    r = fleet.create(stages="1,100%", bake_s=10)
    fleet.tick()
    with fleet.db.begin() as conn:
        paused = commands.pause(conn, r.id, now=fleet.clock())
    assert paused.state == "paused"
    fleet.act()
    fleet.tick(1)
    assert fleet.statuses(r.id)["dev-00/cam0"] == "succeeded"  # still watched while paused
    fleet.tick(100)
    assert fleet.desired("dev-01") is None
    with (
        fleet.db.begin() as conn,
        pytest.raises(RolloutError, match="it is paused; `edgefleet rollout resume"),
    ):
        commands.pause(conn, r.id, now=fleet.clock())
    with fleet.db.begin() as conn:
        assert commands.resume(conn, r.id, now=fleet.clock()).state == "active"
    fleet.tick(1)
    assert fleet.desired_model("dev-01") == "m@2"
    assert fleet.run(r.id).state == "completed"
    with fleet.db.begin() as conn, pytest.raises(RolloutError, match="only a paused rollout"):
        commands.resume(conn, r.id, now=fleet.clock())


def test_operator_abort_rolls_back_every_touched_device(fleet: Fleet) -> None:
    fleet.model()
    fleet.add(*ids(6))
    r = fleet.create(stages="2,100%", bake_s=1000)
    fleet.tick()
    fleet.act(devices=["dev-00"])
    fleet.tick(1)
    with fleet.db.begin() as conn:
        aborted = commands.abort(
            conn, r.id, now=fleet.clock(), by="token 'ops'", note="wrong model"
        )
    assert aborted.state == "aborted" and aborted.reason == "operator"
    assert aborted.detail == "aborted by token 'ops': wrong model"
    assert aborted.rolled_back_at is None  # the engine writes the desired states
    fleet.tick(1)
    done = fleet.rollout(r.id)
    assert done.rolled_back_at == fleet.clock()
    assert fleet.statuses(r.id) == {
        "dev-00/cam0": "rolled_back",
        "dev-01/cam0": "rolled_back",
        **{f"{d}/cam0": "pending" for d in ids(6)[2:]},
    }
    assert [fleet.desired_model(d) for d in ids(2)] == [None, None]
    before = snapshot(fleet.db)
    fleet.tick(1)
    assert snapshot(fleet.db) == before  # the rollback is written once
    with fleet.db.begin() as conn, pytest.raises(RolloutError, match="already got their previous"):
        commands.rollback(conn, r.id, now=fleet.clock())
    with fleet.db.begin() as conn, pytest.raises(RolloutError, match="already got their previous"):
        commands.abort(conn, r.id, now=fleet.clock())


def test_rollback_of_a_completed_rollout_and_of_devices_someone_else_changed(fleet: Fleet) -> None:
    fleet.model(version="2")
    fleet.model(version="3")
    fleet.add(*ids(3))
    first = fleet.run(fleet.create(model="m@2", stages="100%", bake_s=0).id)
    with fleet.db.begin() as conn, pytest.raises(RolloutError, match="`edgefleet rollout rollback"):
        commands.abort(conn, first.id, now=fleet.clock())
    later = fleet.run(fleet.create(model="m@3", select=("dev-02",), stages="100%", bake_s=0).id)
    assert later.state == "completed"
    with fleet.db.begin() as conn:
        assert commands.rollback(conn, first.id, now=fleet.clock(), by="ops").state == "rolled_back"
    fleet.tick(1)
    fleet.act()
    rows = fleet.rows(first.id)
    assert rows[("dev-00", "cam0")].status == "rolled_back"
    assert rows[("dev-02", "cam0")].status == "succeeded"
    assert rows[("dev-02", "cam0")].reason == "not rolled back: its desired model is now m@3"
    assert [fleet.active[(d, "cam0")] for d in ids(3)] == [BASELINE, BASELINE, "m@3"]
    with fleet.db.begin() as conn, pytest.raises(RolloutError) as err:
        commands.pause(conn, 999, now=0)
    assert err.value.kind == "not_found"
