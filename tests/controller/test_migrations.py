"""Alembic: the migrations create the schema from empty and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from controller.db.models import Base
from controller.db.session import Database, current_revision, downgrade, head_revision
from controller.fleet.devices import get_device
from controller.rollouts.executions import list_rollout_devices
from controller.rollouts.records import get_rollout, update_rollout


def test_upgrade_from_empty_creates_every_table(db_url: str) -> None:
    db = Database.from_url(db_url)
    try:
        assert current_revision(db.engine) is None
        db.upgrade()
        tables = set(inspect(db.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
        head = head_revision()
        assert head != "0001", "the models migration exists beside the initial schema"
        assert current_revision(db.engine) == head
        db.upgrade()  # idempotent
        assert current_revision(db.engine) == head
    finally:
        db.dispose()


def test_models_match_migrations_autogenerate_diff_is_empty(db_url: str) -> None:
    db = Database.from_url(db_url)
    try:
        db.upgrade()
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
        assert diff == []
    finally:
        db.dispose()


def test_downgrade_to_base_drops_the_schema_and_upgrade_restores_it(db_url: str) -> None:
    db = Database.from_url(db_url)
    try:
        db.upgrade()
        downgrade(db.engine, "base")
        assert not set(Base.metadata.tables) & set(inspect(db.engine).get_table_names())
        db.upgrade()
        assert set(Base.metadata.tables) <= set(inspect(db.engine).get_table_names())
    finally:
        db.dispose()


def test_upgrade_from_0003_adds_the_gate_columns_and_keeps_existing_rollouts(db_url: str) -> None:
    """0004: rollouts.gate (overrides), rollout_devices.evidence and device_streams.gate
    (the health gate's evidence), all nullable; rows from before read as None."""
    db = Database.from_url(db_url)
    try:
        db.upgrade("0003")
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO devices (id, first_seen, last_seen, online, facts) "
                    "VALUES ('cam-1', 1, 1, true, '{}')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO device_streams (device_id, name, installed, updated_at) "
                    "VALUES ('cam-1', 'cam0', '[]', 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO models (id, name, version, sha256, size, runtime, manifest, "
                    "download_key, created_at) VALUES (1, 'm', '2', 'aa', 1, 'litert', '{}', 'k', 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO rollouts (id, model_id, model, stream, selector, stage_spec, "
                    "stages, device_count, bake_s, max_failures, min_executed, timeout_s, state, "
                    "current_stage, created_at, updated_at) VALUES (1, 1, 'm@2', '*', '[\"all\"]', "
                    "'100%', '[1]', 1, 0, 0.05, 5, 900, 'active', 0, 1, 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO rollout_devices (rollout_id, device_id, stream, stage, status, "
                    "updated_at) VALUES (1, 'cam-1', 'cam0', 0, 'pending', 1)"
                )
            )
        db.upgrade()
        assert current_revision(db.engine) == head_revision() >= "0004"
        columns = {
            t: {c["name"] for c in inspect(db.engine).get_columns(t)}
            for t in ("rollouts", "rollout_devices", "device_streams")
        }
        assert "gate" in columns["rollouts"] and "gate" in columns["device_streams"]
        assert "evidence" in columns["rollout_devices"]
        with db.connect() as conn:
            r = get_rollout(conn, 1)
            assert r is not None and r.model == "m@2" and r.gate is None
            assert [d.evidence for d in list_rollout_devices(conn, 1)] == [None]
            device = get_device(conn, "cam-1")
            assert device is not None and device.streams[0].gate is None
        with db.begin() as conn:
            update_rollout(conn, 1, gate={"max_errors": 2})
        with db.connect() as conn:
            r = get_rollout(conn, 1)
            assert r is not None and r.gate == {"max_errors": 2}
        downgrade(db.engine, "0003")
        assert "gate" not in {c["name"] for c in inspect(db.engine).get_columns("rollouts")}
        with db.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM rollout_devices")).scalar_one() == 1
    finally:
        db.dispose()
