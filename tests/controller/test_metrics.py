"""Prometheus metrics live in a per-app registry: two controllers in one process stay apart;
the rollout gauges are the database's figures, and a scrape answers without a database."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.db.session import Database
from controller.fleet.writes import write_messages
from controller.ingest.writer import Ingestor
from controller.metrics import RolloutCollector, build_registry
from controller.rollouts import commands
from controller.rollouts.records import DEVICE_STATUSES, RolloutInfo, state_counts
from protocol import encode, telemetry_topic
from tests.controller.conftest import Clock, received, status, telemetry
from tests.controller.rollout_fleet import Fleet

Labels = tuple[tuple[str, str], ...]


def test_two_registries_report_their_own_fleet_and_ingest_figures(
    database: Database, tmp_path: Path
) -> None:
    other = Database.from_url(f"sqlite:///{tmp_path / 'other.db'}")
    other.upgrade()
    try:
        with database.begin() as conn:
            write_messages(conn, [received(status("a-1")), received(status("a-2", "offline"))])
        ingestor = Ingestor(db=database)
        ingestor.handle(telemetry_topic("a-1"), encode(telemetry("a-1")))
        ingestor.handle(telemetry_topic("a-1"), b"garbage")
        ingestor.write_pending()
        first = generate_latest(build_registry(db=database, ingest_snapshot=ingestor.snapshot))
        second = generate_latest(build_registry(db=other)).decode()
    finally:
        other.dispose()
    text = first.decode()
    assert 'edgefleet_devices{state="online"} 1.0' in text
    assert 'edgefleet_devices{state="offline"} 1.0' in text
    assert 'edgefleet_ingest_messages_stored_total{kind="telemetry"} 1.0' in text
    assert 'edgefleet_ingest_messages_malformed_total{kind="telemetry"} 1.0' in text
    assert 'edgefleet_ingest_lag_seconds{quantile="0.95"}' in text
    assert 'edgefleet_devices{state="online"} 0.0' in second
    assert "edgefleet_ingest" not in second
    assert b"edgefleet_" not in generate_latest(REGISTRY)


def test_database_down_is_a_gauge_not_a_failed_scrape(tmp_path: Path) -> None:
    db = Database.from_url("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    text = generate_latest(build_registry(db=db)).decode()
    assert "edgefleet_database_up 0.0" in text
    assert "edgefleet_rollout" not in text  # absent, not zero: no figure is better than a wrong one
    db.dispose()


def _samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, Labels], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(prefix)
    }


def _live(r: RolloutInfo, **extra: str) -> Labels:
    labels = {"rollout": str(r.id), "model": r.model, "stream": r.stream, **extra}
    return tuple(sorted(labels.items()))


def test_rollout_collector_matches_the_database(database: Database, clock: Clock) -> None:
    fleet = Fleet(database, clock)
    fleet.model("m", "2")
    fleet.model("m", "3")
    fleet.add(*(f"dev-{i:02d}" for i in range(6)))
    completed = fleet.create(select=("dev-05",), stages="100%", bake_s=0)
    assert fleet.run(completed.id).state == "completed"
    aborted = fleet.create(select=("dev-04",))
    with database.begin() as conn:
        commands.abort(conn, aborted.id, now=clock())
    fleet.run(aborted.id)  # the engine writes the rollback; it stays aborted
    active = fleet.create(select=("dev-00", "dev-01", "dev-02"), stages="1,100%", bake_s=0)
    fleet.tick(1)  # stage 1: dev-00
    fleet.act()
    fleet.tick(1)  # dev-00 succeeded
    fleet.tick(1)  # no bake: stage 2, dev-01 and dev-02 queued
    paused = fleet.create(model="m@3", select=("dev-03",), stream="*")
    with database.begin() as conn:
        commands.pause(conn, paused.id, now=clock())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RolloutCollector(database))
    got = _samples(registry, "edgefleet_rollout")
    assert _samples(build_registry(db=database), "edgefleet_rollout") == got

    assert {labels: v for (name, labels), v in got.items() if name == "edgefleet_rollouts"} == {
        (("state", "active"),): 1,
        (("state", "paused"),): 1,
        (("state", "completed"),): 1,
        (("state", "aborted"),): 1,
        (("state", "rolled_back"),): 0,  # no rollout in it: still a series
    }
    executions = {
        labels: v for (name, labels), v in got.items() if name == "edgefleet_rollout_executions"
    }
    assert {dict(labels)["rollout"] for labels in executions} == {str(active.id), str(paused.id)}
    assert executions[_live(active, status="succeeded")] == 1
    assert executions[_live(active, status="queued")] == 2
    assert executions[_live(paused, status="pending")] == 1
    assert dict(_live(paused))["stream"] == "*"
    assert got[("edgefleet_rollout_stage", _live(active))] == 2  # 1-based
    assert got[("edgefleet_rollout_stages", _live(active))] == 2
    assert got[("edgefleet_rollout_stage", _live(paused))] == 1

    # every figure is the database's, every status exported (0 when none)
    with database.connect() as conn:
        assert state_counts(conn) == {
            "active": 1,
            "paused": 1,
            "completed": 1,
            "aborted": 1,
        }
        for r in (active, paused):
            detail = commands.detail(conn, r.id, now=clock(), with_devices=False)
            for status in DEVICE_STATUSES:
                assert executions[_live(r, status=status)] == detail.counts.get(status, 0)
            assert got[("edgefleet_rollout_stage", _live(r))] == detail.rollout.current_stage + 1
            assert got[("edgefleet_rollout_stages", _live(r))] == len(detail.rollout.stages)

    # once it ends, a rollout's series go and its state count moves
    with database.begin() as conn:
        commands.abort(conn, active.id, now=clock())
    after = _samples(registry, "edgefleet_rollout")
    assert after[("edgefleet_rollouts", (("state", "aborted"),))] == 2
    assert after[("edgefleet_rollouts", (("state", "active"),))] == 0
    assert {
        dict(labels)["rollout"]
        for (name, labels) in after
        if name == "edgefleet_rollout_executions"
    } == {str(paused.id)}


def test_rollout_collector_without_a_database_exports_nothing_and_does_not_raise(
    tmp_path: Path,
) -> None:
    db = Database.from_url("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    try:
        assert list(RolloutCollector(db).collect()) == []
    finally:
        db.dispose()
    # a database without the rollout tables (not migrated): the same
    empty = Database.from_url(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert list(RolloutCollector(empty).collect()) == []
    finally:
        empty.dispose()
