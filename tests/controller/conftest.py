"""Controller fixtures: a database URL for SQLite and for PostgreSQL (fresh schema per test).

PostgreSQL runs at 127.0.0.1:5432 (user postgres, database ``test``). Its tests are
skipped only when EDGEFLEET_TEST_PG=0; otherwise an unreachable server fails them.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from controller.cli import main
from controller.db.session import Database
from controller.fleet.tokens import ROLES, create_token
from controller.fleet.writes import Received
from protocol import Event, Reported, Status, StreamReport, StreamStatus, Telemetry
from tests.waiting import wait_for

if TYPE_CHECKING:
    from tests.controller.rollout_fleet import Fleet

PG_BASE = os.environ.get(
    "EDGEFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pg_enabled() -> bool:
    return os.environ.get("EDGEFLEET_TEST_PG", "1") != "0"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    if not pg_enabled():
        pytest.skip("PostgreSQL tests disabled with EDGEFLEET_TEST_PG=0")
    schema = f"ef_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Parametrized over SQLite (a file in tmp_path) and PostgreSQL (a fresh schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database."""
    db = Database.from_url(db_url)
    db.upgrade()
    yield db
    db.dispose()


class Clock:
    """A fake clock for retention and token tests."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def tokens(database: Database, clock: Clock) -> dict[str, str]:
    """One API token per role, by role name."""
    out: dict[str, str] = {}
    with database.begin() as conn:
        for role in ROLES:
            _, out[role] = create_token(conn, name=f"t-{role}", role=role, now=clock())
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(database: Database, clock: Clock) -> Fleet:
    """An empty fleet written straight into the database (tests/controller/rollout_fleet.py).
    A module whose tests need devices or models from the start defines its own ``fleet``."""
    # Imported here, not at the top: rollout_fleet imports Clock from this module.
    from tests.controller.rollout_fleet import Fleet

    return Fleet(database, clock)


# --- message builders -------------------------------------------------------------------


def status(
    device_id: str, state: str = "online", *, ts: float = 1000.0, model: str = "m@1"
) -> Status:
    return Status(
        schema=1,
        device_id=device_id,
        state=state,  # type: ignore[arg-type]
        ts=ts,
        agent_version="1.2.3",
        started_at=ts - 10,
        streams=[StreamStatus(name="cam0", source_state="running", model=model)],
    )


def telemetry(
    device_id: str, *, ts: float = 1000.0, cpu: float = 50.0, **extra: object
) -> Telemetry:
    fields: dict[str, object] = {
        "schema": 1,
        "device_id": device_id,
        "ts": ts,
        "interval_s": 10.0,
        "cpu_percent": cpu,
        "mem_percent": 40.0,
        "mem_used_bytes": 1000,
        "temp_c": 50.0,
        "disk_percent": 30.0,
        "disk_free_bytes": 2000,
        "spool_depth": 3,
        "spool_dropped": 0,
    }
    fields.update(extra)
    return Telemetry(**fields)  # type: ignore[arg-type]


def reported(device_id: str, *, active: str = "m@2", previous: str | None = "m@1") -> Reported:
    return Reported(
        schema=1,
        device_id=device_id,
        ts=1000.0,
        desired_rev=7,
        streams={"cam0": StreamReport(active=active, previous=previous, phase="committed")},
    )


def event(device_id: str, code: str = "deploy.committed", *, ts: float = 1000.0) -> Event:
    return Event(
        schema=1,
        device_id=device_id,
        ts=ts,
        code=code,
        level="info",
        message="done",
        details={"bytes": 12, "ok": True},
    )


def received(message: Status | Telemetry | Reported | Event, at: float = 1000.0) -> Received:
    return Received(
        topic=f"edgefleet/v1/{message.device_id}/x",
        device_id=message.device_id,
        message=message,
        received_at=at,
    )


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server (127.0.0.1, free port) in a thread; yields its URL."""
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


NOWHERE = "http://127.0.0.1:9"
"""A controller URL nothing listens on: for CLI checks that must refuse before any request."""


class Cli:
    """``edgefleet`` through click's runner, isolated from the user's env and config file;
    ``url`` and ``token`` set EDGEFLEET_URL and EDGEFLEET_TOKEN."""

    def __init__(self, home: Path, *, url: str | None = None, token: str | None = None) -> None:
        self.runner = CliRunner()
        self.env: dict[str, str | None] = {
            "XDG_CONFIG_HOME": str(home),
            "EDGEFLEET_URL": url,
            "EDGEFLEET_TOKEN": token,
            "EDGEFLEET_CONFIG": None,
            "EDGEFLEET_DB_URL": None,
        }

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(main, list(args), env=self.env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


def rollout_create_refused(home: Path, *args: str) -> str:
    """``edgefleet rollout create m@1 --select all ARGS`` with nothing listening at the
    controller URL: the CLI must refuse it itself (exit 1). Returns its stderr."""
    result = Cli(home, url=NOWHERE)("rollout", "create", "m@1", "--select", "all", *args)
    assert result.exit_code == 1, result.output
    return result.stderr
