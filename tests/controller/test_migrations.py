"""Alembic: the migrations create the schema from empty and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from controller.db.models import Base
from controller.db.session import Database, current_revision, downgrade, head_revision


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
