"""A throwaway PostgreSQL schema for a benchmark run (EDGEFLEET_BENCH_PG_URL or the local test DB)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

from sqlalchemy import create_engine, text

PG_URL = os.environ.get(
    "EDGEFLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def fresh_schema() -> tuple[str, Callable[[], None]]:
    """A database URL on a new, empty schema, and the function that drops it."""
    schema = f"ef_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

    return f"{PG_URL}?options=-csearch_path%3D{schema}", drop
