"""Helpers of the rollout engine tests (tests/controller/test_rollout_engine_*.py); their
``fleet`` fixture is tests/controller/conftest.py's."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from controller.db.models import device_desired, rollout_devices, rollouts
from controller.db.session import Database


def ids(n: int, prefix: str = "dev") -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(n)]


def snapshot(db: Database) -> list[Any]:
    """Every row of the rollout tables, sorted: what a tick may or may not have changed."""
    with db.connect() as conn:
        return [
            sorted(tuple(r) for r in conn.execute(select(t)))
            for t in (rollouts, rollout_devices, device_desired)
        ]
