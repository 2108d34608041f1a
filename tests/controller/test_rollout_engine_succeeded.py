"""Succeeded executions are re-derived every ``SUCCEEDED_EVERY_S`` and before any decision
that could advance or complete a rollout, not on every tick (SQLite and PostgreSQL, fake
clock). With thousands of devices done, re-deriving them all every second was most of a
tick's work (bench.rollout --scale)."""

from __future__ import annotations

from typing import Any

import pytest

from controller.rollouts import executions
from controller.rollouts.engine import SUCCEEDED_EVERY_S
from controller.rollouts.records import IN_FLIGHT_WATCHED, WATCHED
from tests.controller.rollout_engine_support import ids
from tests.controller.rollout_fleet import BASELINE, Fleet


class _Watch:
    """Records which statuses each tick re-derived and how many executions it read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[tuple[str, ...], int]] = []
        original = executions.executions_to_watch

        def watched(*args: Any, **kwargs: Any) -> list[executions.Execution]:
            out = original(*args, **kwargs)
            self.calls.append((tuple(kwargs.get("statuses", WATCHED)), len(out)))
            return out

        monkeypatch.setattr(executions, "executions_to_watch", watched)  # the engine calls it so

    def last(self) -> tuple[tuple[str, ...], int]:
        return self.calls[-1]


def _take_back(fleet: Fleet, device: str, target: str) -> None:
    """The device rolls the model back after it had committed it (probation failed)."""
    fleet.active[(device, "cam0")] = BASELINE
    fleet.publish_report(device, {"cam0": ("rolled_back", target, "probation: no detections")})


def test_succeeded_executions_are_reread_every_10_s_and_a_later_failure_is_counted(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.model()
    fleet.add(*ids(6))
    r = fleet.create(stages="1,100%", bake_s=120, timeout_s=600, max_failures=0.5)
    watch = _Watch(monkeypatch)
    fleet.tick()
    fleet.act()
    fleet.tick(1)
    assert fleet.statuses(r.id)["dev-00/cam0"] == "succeeded"
    fleet.tick(60)
    fleet.tick(60)  # the canary's bake is over: stage 2 is assigned
    fleet.act()
    fleet.tick(1)
    assert list(fleet.statuses(r.id).values()).count("succeeded") == 6
    assert watch.last() == (IN_FLIGHT_WATCHED, 5)  # stage 2's, not the canary
    fleet.tick(1)
    assert watch.last() == (IN_FLIGHT_WATCHED, 0)  # nothing in flight to read
    _take_back(fleet, "dev-03", "m@2")
    fleet.tick(1)
    assert fleet.statuses(r.id)["dev-03/cam0"] == "succeeded"  # not re-read yet
    fleet.tick(SUCCEEDED_EVERY_S)
    assert watch.last() == (WATCHED, 6)
    assert fleet.statuses(r.id)["dev-03/cam0"] == "failed"
    assert fleet.rollout(r.id).state == "active"  # 1 of 6 failed, under max_failures
    before = len(watch.calls)
    for _ in range(int(SUCCEEDED_EVERY_S) - 1):  # a second apart: the succeeded stay unread
        fleet.tick(1)
    assert [c[0] for c in watch.calls[before:]] == [IN_FLIGHT_WATCHED] * 9


def test_a_success_taken_back_during_the_bake_stops_the_stage_from_advancing(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the 10 s beat, the tick that ends a bake re-reads every succeeded execution
    before it decides: the canary's later rollback aborts the rollout, stage 2 never starts."""
    fleet.model()
    fleet.add(*ids(4))
    r = fleet.create(stages="1,100%", bake_s=5, timeout_s=600)
    watch = _Watch(monkeypatch)
    fleet.tick()
    fleet.act()
    fleet.tick(1)  # the canary succeeded: its stage is done, the 5 s bake starts
    assert fleet.statuses(r.id)["dev-00/cam0"] == "succeeded"
    fleet.tick(1)
    assert watch.last()[0] == IN_FLIGHT_WATCHED
    _take_back(fleet, "dev-00", "m@2")
    fleet.tick(4)  # the bake is over, 6 s after the last full look: inside the 10 s beat
    assert watch.last()[0] == WATCHED
    rollout = fleet.rollout(r.id)
    assert rollout.state in ("aborted", "rolled_back"), rollout
    assert rollout.current_stage == 0
    assert all(fleet.desired(d) is None for d in ids(4)[1:])
