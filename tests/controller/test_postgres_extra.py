"""PostgreSQL's driver comes with the `postgres` extra: without it, the error names that extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from controller.db.session import Database, make_engine
from controller.errors import DatabaseError

EXTRA = "pip install 'edgefleet[controller,postgres]'"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://edgefleet:s3cret@db.invalid:5432/edgefleet",
        # No driver named: SQLAlchemy picks its default (psycopg2 before 2.1, psycopg after).
        "postgresql://edgefleet:s3cret@db.invalid/edgefleet",
    ],
)
def test_postgresql_url_without_its_driver_names_the_postgres_extra(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    for module in ("psycopg", "psycopg2"):  # `import psycopg` now raises ImportError
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DatabaseError) as caught:
        make_engine(url)
    message = str(caught.value)
    assert EXTRA in message
    assert "postgresql+psycopg://" in message
    assert "s3cret" not in message
    assert isinstance(caught.value.__cause__, ImportError)


def test_database_from_url_reports_the_missing_driver_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(DatabaseError, match=r"install the postgres extra"):
        Database.from_url("postgresql+psycopg://edgefleet@db.invalid/edgefleet")


def test_sqlite_needs_no_extra(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path}/controller.db")
    try:
        db.ping()
        assert db.dialect == "sqlite"
    finally:
        db.dispose()
