"""The rollout engine alone at scale (``bench.rollout --scale N,...``): the time of its ticks
over one rollout of N executions on the chosen database, as the executions move from queued
to in progress (carrying the shadow phase's health-gate evidence) to succeeded."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from controller.db.session import Database
from controller.fleet.registry import add_model
from controller.fleet.writes import Received, write_messages
from controller.rollouts import commands
from controller.rollouts.engine import RolloutEngine
from controller.rollouts.records import status_counts
from protocol import Reported, Status, StreamReport, StreamStatus
from tools.simulator.gate import evidence


def _report_all(
    db: Database, ids: list[str], at: float, stream: Callable[[], StreamReport]
) -> None:
    """Every device of ``ids`` reports its stream ``cam0`` as ``stream()`` (desired rev 1)."""
    reports = [
        Received(
            topic="t",
            device_id=d,
            received_at=at,
            message=Reported(
                schema=1, device_id=d, ts=at, desired_rev=1, streams={"cam0": stream()}
            ),
        )
        for d in ids
    ]
    with db.begin() as conn:
        for i in range(0, len(reports), 5000):
            write_messages(conn, reports[i : i + 5000])


def tick_scale(db_url: str, executions: int) -> dict[str, float]:
    """Seconds of engine ticks of one rollout with ``executions``: the stage assignment; with
    every one in progress, a tick that re-derives them all (a new leader, or every
    ``SUCCEEDED_EVERY_S``), one after a tenth of the devices reported, one after none did;
    once every execution succeeded, a tick that re-derives them all and one between."""
    db = Database.from_url(db_url)
    db.upgrade()
    now = time.time()
    ids = [f"dev-{i:06d}" for i in range(executions)]
    items = []
    for d in ids:
        items.append(
            Received(
                topic="t",
                device_id=d,
                received_at=now,
                message=Status(
                    schema=1,
                    device_id=d,
                    state="online",
                    ts=now,
                    agent_version="1",
                    started_at=now,
                    streams=[StreamStatus(name="cam0", source_state="running", model="base@1")],
                ),
            )
        )
    with db.begin() as conn:
        for i in range(0, len(items), 5000):
            write_messages(conn, items[i : i + 5000])
        add_model(
            conn, name="m", version="2", sha256="0" * 64, size=1, runtime="litert", manifest={},
            signature=None, key_id=None, now=now,
        )  # fmt: skip
        r = commands.create_rollout(
            conn, commands.RolloutRequest(model="m@2", select=["all"], stages="100%"), now=now
        )
    engine = RolloutEngine(db, base_url=lambda: "http://bench", clock=time.time)
    t0 = time.perf_counter()
    engine.tick()
    out = {"assign": time.perf_counter() - t0}
    rng = random.Random(0)

    def shadow() -> StreamReport:
        gate = evidence("shadow", rng)
        return StreamReport(active="base@1", phase="shadow", target="m@2", gate=gate)

    _report_all(db, ids, now, shadow)
    engine.tick()  # queued → in_progress: every row written once
    full, tenth, quiet = [], [], []
    for round_ in range(3):
        engine._versions.look_at_everything_next()
        t0 = time.perf_counter()
        engine.tick()
        full.append(time.perf_counter() - t0)
        _report_all(db, ids[round_::10], now + round_, shadow)
        t0 = time.perf_counter()
        report = engine.tick()
        tenth.append(time.perf_counter() - t0)
        assert report.rederived == len(ids[round_::10]), report
        t0 = time.perf_counter()
        engine.tick()
        quiet.append(time.perf_counter() - t0)
    with db.connect() as conn:
        assert status_counts(conn, [r.id])[r.id] == {"in_progress": executions}
    out.update(in_flight_full=min(full), in_flight_tenth=min(tenth), in_flight_quiet=min(quiet))
    _report_all(db, ids, now + 5, lambda: StreamReport(active="m@2", phase="idle", target="m@2"))
    engine.tick()  # in_progress → succeeded
    with db.connect() as conn:
        assert status_counts(conn, [r.id])[r.id] == {"succeeded": executions}
    full, between = [], []
    for _ in range(3):
        engine._versions.look_at_everything_next()
        t0 = time.perf_counter()
        engine.tick()
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.tick()
        between.append(time.perf_counter() - t0)
    db.dispose()
    out.update(succeeded_full=min(full), succeeded_between=min(between))
    return out
