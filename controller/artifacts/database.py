"""The ``database`` bundle store: bundles as rows of ``bundle_chunks`` (``models.chunk_bytes``).

Uploads are written in the transaction that adds the model row, so a model is never visible
without its bytes. Reads list the chunk offsets of the wanted range, then fetch one chunk per
short query: a slow device holds no connection while it downloads, and memory stays at one
chunk whatever the bundle's size.

A rollout has every device of a stage fetch the same bundle, so each replica keeps recently
read bundles in memory (``models.cache_bytes``, least recently used out; a bundle larger
than a quarter of it is never kept): bundles are addressed by their sha256 and never change,
so a cached copy cannot go stale, and the API checks the model row before every read. A
cached bundle's size comes from the cache too, and the download route answers it in one
response body (no read, no database query beyond the model row).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, delete, func, select

from controller.artifacts.base import StorageError
from controller.db.models import bundle_chunks
from controller.db.session import Database

_T = bundle_chunks.c


class DatabaseBundleStore:
    """Bundles in the controller's database (any replica on it serves them)."""

    kind: Literal["database"] = "database"
    transactional = True

    def __init__(
        self, database: Database, *, chunk_bytes: int = 1 << 20, cache_bytes: int = 64 << 20
    ) -> None:
        self.database = database
        self.chunk_bytes = chunk_bytes
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        """One lock per bundle being read into the cache (under ``_loading_lock``)."""
        self._loading_lock = threading.Lock()

    def describe(self) -> str:
        return f"the database {self.database.url} (table bundle_chunks)"

    def stored_size(self, sha256: str) -> int | None:
        cached = self.cached(sha256)
        if cached is not None:  # the rows are deleted only with the model, checked before
            return len(cached)
        with self.database.connect() as conn:
            return _stored_size(conn, sha256)

    def put(self, src: Path, sha256: str, size: int, conn: Connection | None = None) -> None:
        """Insert ``src`` in chunks through ``conn`` (the caller's transaction) or a new one."""
        if conn is not None:
            self._put(conn, src, sha256, size)
            return
        with self.database.begin() as own:
            self._put(own, src, sha256, size)

    def _put(self, conn: Connection, src: Path, sha256: str, size: int) -> None:
        have = _stored_size(conn, sha256)
        if have == size:
            return  # the same bundle, stored for another model version
        if have is not None:  # a partial set cannot be committed, but be safe
            conn.execute(delete(bundle_chunks).where(_T.sha256 == sha256))
        insert = _insert_ignoring_duplicates(conn)
        pos = 0
        with src.open("rb") as f:
            while block := f.read(self.chunk_bytes):
                conn.execute(insert.values(sha256=sha256, pos=pos, data=block))
                pos += len(block)
        if pos != size:
            raise StorageError(f"bundle {sha256} has {pos} bytes, expected {size}")

    def read(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        end = start + length  # exclusive
        cached = self.cached(sha256)
        if cached is not None:
            return iter([cached[start:end]])
        with self.database.connect() as conn:
            spans = conn.execute(
                select(_T.pos, func.length(_T.data)).where(_T.sha256 == sha256).order_by(_T.pos)
            ).all()
        every = [(int(p), int(n)) for p, n in spans]
        total = sum(n for _, n in every)
        if every and total <= self.cache_bytes // 4:
            with self._loading_lock:
                loading = self._loading.setdefault(sha256, threading.Lock())
            with loading:  # the devices of a stage arrive together: one of them reads the rows
                whole = self.cached(sha256)
                if whole is None:
                    whole = b"".join(self._blocks(sha256, every, 0, total))
                    self._keep(sha256, whole)
            with self._loading_lock:
                self._loading.pop(sha256, None)
            return iter([whole[start:end]])
        wanted = [(p, n) for p, n in every if p < end and p + n > start]
        return self._blocks(sha256, wanted, start, end)

    def cached(self, sha256: str) -> bytes | None:
        with self._cache_lock:
            data = self._cache.get(sha256)
            if data is not None:
                self._cache.move_to_end(sha256)
            return data

    def _keep(self, sha256: str, data: bytes) -> None:
        with self._cache_lock:
            if sha256 in self._cache:
                return
            self._cache[sha256] = data
            self._cached_bytes += len(data)
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)

    def _forget(self, sha256: str) -> None:
        with self._cache_lock:
            data = self._cache.pop(sha256, None)
            if data is not None:
                self._cached_bytes -= len(data)

    def _blocks(
        self, sha256: str, spans: list[tuple[int, int]], start: int, end: int
    ) -> Iterator[bytes]:
        for pos, n in spans:
            with self.database.connect() as conn:
                data = conn.execute(
                    select(_T.data).where(_T.sha256 == sha256, _T.pos == pos)
                ).scalar_one_or_none()
            if data is None:
                raise StorageError(f"chunk {pos} of bundle {sha256} vanished while read")
            block = bytes(data)
            lo = max(start - pos, 0)
            hi = min(end - pos, n)
            yield block[lo:hi]

    def redirect_url(self, sha256: str) -> str | None:
        return None

    def delete(self, sha256: str) -> None:
        self._forget(sha256)
        with self.database.begin() as conn:
            conn.execute(delete(bundle_chunks).where(_T.sha256 == sha256))


def _stored_size(conn: Connection, sha256: str) -> int | None:
    total = conn.execute(
        select(func.sum(func.length(_T.data))).where(_T.sha256 == sha256)
    ).scalar_one_or_none()
    return None if total is None else int(total)


def _insert_ignoring_duplicates(conn: Connection) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: two uploads of the same bundle both succeed."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(bundle_chunks).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(bundle_chunks).on_conflict_do_nothing()
