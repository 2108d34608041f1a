"""Engines for SQLite (WAL) and PostgreSQL, and the Alembic migrations run from code."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from controller.config import hide_password
from controller.errors import DatabaseError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_PG_MIGRATION_LOCK = 0x6564_6765_666C  # "edgefl": one migrating replica at a time


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return hide_password(url)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str, *, echo: bool = False, pool_size: int = 5) -> Engine:
    """An engine for ``url``: SQLite gets WAL + synchronous=NORMAL, its folder is created."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise DatabaseError(
            f"database URL {redact(url)!r} is not valid: use sqlite:///PATH or "
            "postgresql+psycopg://user@host:5432/db"
        ) from err
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
    else:
        kwargs.update(pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as err:
        if parsed.get_backend_name() == "postgresql":
            raise DatabaseError(
                f"no PostgreSQL driver for {redact(url)} ({err}): install the postgres extra "
                "(pip install 'edgefleet[controller,postgres]', psycopg 3) and use a "
                "postgresql+psycopg:// URL"
            ) from err
        raise DatabaseError(
            f"no database driver for {redact(url)} ({err}): install the controller extra "
            "(pip install 'edgefleet[controller]')"
        ) from err
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class Database:
    """An engine plus transaction helpers. Store functions take the Connection it yields."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, *, echo: bool = False, pool_size: int = 5) -> Database:
        return cls(make_engine(url, echo=echo, pool_size=pool_size))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads (autobegin; rolled back at the end)."""
        with self.engine.connect() as conn:
            yield conn

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def upgrade(self, revision: str = "head") -> None:
        upgrade(self.engine, revision)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic Config built in code (no alembic.ini): script location inside the package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def quiet_alembic() -> None:
    """Alembic logs about ten INFO lines (plugins, context, each revision) on every upgrade,
    at every controller start: keep it at WARNING unless someone set its level (``-v``)."""
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:
        alembic_log.setLevel(logging.WARNING)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision`` (idempotent). PostgreSQL: under an advisory lock."""
    quiet_alembic()  # before the import: importing alembic.command logs its plugins
    from alembic import command

    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            command.upgrade(alembic_config(conn), revision)
    except SQLAlchemyError as err:
        raise DatabaseError(
            f"cannot migrate the database {engine.url.render_as_string(hide_password=True)}: "
            f"{err.__class__.__name__}: {getattr(err, 'orig', err)}; check that it is reachable "
            "and that the user may create tables"
        ) from err


def downgrade(engine: Engine, revision: str) -> None:
    quiet_alembic()
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    quiet_alembic()  # MigrationContext.configure logs "Context impl ..." at INFO
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev: str | None = MigrationContext.configure(conn).get_current_revision()
        return rev


def head_revision() -> str:
    """The newest migration shipped with this package (what ``upgrade()`` brings a database to)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the package ships no migrations"
    return head
