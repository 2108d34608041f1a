"""The SQL statements a database runs meanwhile, for tests that count them (a bundle read
from memory runs none; a model row is read once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event

from controller.db.session import Database


class Statements:
    """Records every statement ``database`` runs from now until :meth:`close` (or the end of
    a ``with`` block); thread-safe (a list append)."""

    def __init__(self, database: Database) -> None:
        self.seen: list[str] = []
        self._engine = database.engine
        event.listen(self._engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seen.append(statement)

    @property
    def count(self) -> int:
        return len(self.seen)

    def matching(self, predicate: Callable[[str], bool]) -> int:
        """How many of the statements so far ``predicate`` holds for."""
        return sum(1 for s in list(self.seen) if predicate(s))

    def during(self, fn: Callable[..., object]) -> int:
        """Statements run while ``fn()`` ran."""
        before = self.count
        fn()
        return self.count - before

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._record)

    def __enter__(self) -> Statements:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
