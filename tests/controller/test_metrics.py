"""Prometheus metrics live in a per-app registry: two controllers in one process stay apart."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY, generate_latest

from controller.db.session import Database
from controller.ingest import Ingestor
from controller.metrics import build_registry
from controller.store import write_messages
from protocol import encode, telemetry_topic
from tests.controller.conftest import received, status, telemetry


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
    db.dispose()
