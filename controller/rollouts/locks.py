"""How writers of rollouts are serialised: the rollout row lock and PostgreSQL advisory locks.

``lock_rollout`` starts a transaction with a no-op UPDATE of the rollout's row. On
PostgreSQL that is a row lock (like SELECT ... FOR UPDATE); on SQLite it takes the database
write lock at once (pysqlite begins the transaction at the first write, so a transaction
that read first could otherwise write over a change committed meanwhile).

``pg_lock_sql`` builds the advisory locks: ``PG_CREATE_LOCK`` serialises creating
rollouts, ``PG_ENGINE_LOCK`` lets one replica at a time run the engine.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text, update

from controller.db.models import rollouts

_PG_LOCK_NAMESPACE = 0x6566_7230
"""First key of the PostgreSQL advisory locks of rollouts ("efr0"); the second is a hash of
the database and schema, so separate installations in one database do not block each other."""
PG_CREATE_LOCK = 1
PG_ENGINE_LOCK = 2


def pg_lock_sql(function: str, which: int) -> Any:
    """``SELECT pg_..._lock(ns, hash)`` for one of the rollout locks of this schema."""
    return text(
        f"SELECT {function}(CAST(:ns AS integer), "
        "hashtext(current_database() || '.' || current_schema() || '.' || :which))"
    ).bindparams(ns=_PG_LOCK_NAMESPACE, which=str(which))


def lock_rollout(conn: Connection, rollout_id: int) -> bool:
    """Serialise with every other writer of this rollout (see the module doc); False: no such rollout."""
    result = conn.execute(
        update(rollouts).where(rollouts.c.id == rollout_id).values(updated_at=rollouts.c.updated_at)
    )
    return bool(result.rowcount)
