"""Small SQL helpers shared by the repositories (``controller.fleet``, ``controller.rollouts``).

``upsert``: ``insert(table)`` with the dialect's ``ON CONFLICT``; ``chunks``: long ``IN``
lists cut to a size every driver accepts; ``from_row``: a result row as a frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    D = TypeVar("D", bound=DataclassInstance)
else:
    D = TypeVar("D")


def upsert(conn: Connection, table: Any) -> Any:
    """``insert(table)`` with the dialect's ON CONFLICT support."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)
    raise NotImplementedError(f"unsupported database dialect {conn.dialect.name}")


def chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    """``items`` in lists of at most ``size`` (bound parameters of one ``IN``)."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


@functools.cache
def _field_names(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def from_row(cls: type[D], row: Any, **converted: Any) -> D:
    """The dataclass ``cls`` of a result row: every field is the row's column of that name,
    except the ones given in ``converted`` (values the caller converted or added)."""
    values = {name: getattr(row, name) for name in _field_names(cls) if name not in converted}
    return cls(**values, **converted)
