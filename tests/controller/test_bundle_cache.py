"""Each replica keeps recently downloaded bundles in memory (``models.cache_bytes``) with
``storage = "database"``: the devices of a rollout stage fetch one bundle, and only the first
download of it reads the database. Checked by counting the SQL statements a read runs, on
SQLite and PostgreSQL, and over real HTTP."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.api import create_app
from controller.artifacts.database import DatabaseBundleStore
from controller.blobstore import BlobStore, ModelHosting
from controller.bundles import package_model
from controller.db.session import Database
from tests.controller.conftest import Clock, serving
from tests.controller.sql_statements import Statements

MANIFEST = (
    Path(__file__).resolve().parents[2] / "inference" / "assets" / "blazeface-short-int8.json"
)
CHUNK = 65_536


def _bundle(folder: Path, size: int, seed: int) -> tuple[Path, str]:
    data = (hashlib.sha256(bytes([seed])).digest() + os.urandom(32)) * (size // 64)
    path = folder / f"b{seed}.efb"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _chunk_read(statement: str) -> bool:
    """A statement that fetched a chunk's bytes (``SELECT bundle_chunks.data ...``)."""
    return statement.lstrip().startswith("SELECT bundle_chunks.data")


def _on_chunks(statement: str) -> bool:
    """A statement that touched ``bundle_chunks`` at all (sizes, spans, bytes)."""
    return "bundle_chunks" in statement


@pytest.fixture
def record(database: Database) -> Iterator[Callable[[], Statements]]:
    """Starts recording ``database``'s statements from the call on; stopped after the test."""
    started: list[Statements] = []

    def start() -> Statements:
        started.append(Statements(database))
        return started[-1]

    yield start
    for statements in started:
        statements.close()


def _read(store: DatabaseBundleStore, sha: str, start: int, length: int) -> bytes:
    return b"".join(store.read(sha, start, length))


def _app_with_a_bundle(database: Database, tmp_path: Path) -> tuple[Any, bytes]:
    """The API on ``database`` storing bundles there (the default cache), and the bytes of
    the shipped INT8 model's bundle to upload."""
    efb = tmp_path / "face.efb"
    package_model(MANIFEST, out=efb, name="face", version="1.0.0")
    app = create_app(db=database, clock=Clock())
    app.state.models = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"),
        max_bundle_bytes=10_000_000,
        store=DatabaseBundleStore(database, chunk_bytes=CHUNK),
    )
    return app, efb.read_bytes()


def test_a_bundle_is_read_from_the_database_once_then_from_memory(
    database: Database, record: Callable[[], Statements], tmp_path: Path
) -> None:
    store = DatabaseBundleStore(database, chunk_bytes=CHUNK, cache_bytes=4 << 20)
    path, sha = _bundle(tmp_path, 200_000, 1)
    data = path.read_bytes()
    store.put(path, sha, len(data))
    sql = record()
    assert sql.during(lambda: _read(store, sha, 0, len(data))) >= 2  # spans, then chunks
    for start, length in [(0, len(data)), (0, 1), (CHUNK - 3, 7), (len(data) - 10, 10)]:
        got: list[bytes] = []
        assert sql.during(lambda s=start, n=length, g=got: g.append(_read(store, sha, s, n))) == 0
        assert got == [data[start : start + length]]


def test_devices_arriving_together_read_the_rows_once(
    database: Database, record: Callable[[], Statements], tmp_path: Path
) -> None:
    store = DatabaseBundleStore(database, chunk_bytes=CHUNK, cache_bytes=4 << 20)
    path, sha = _bundle(tmp_path, 200_000, 3)
    data = path.read_bytes()
    store.put(path, sha, len(data))
    sql = record()
    barrier = threading.Barrier(8)
    got: list[bytes] = []

    def device() -> None:
        barrier.wait()
        got.append(_read(store, sha, 0, len(data)))

    threads = [threading.Thread(target=device) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [data] * 8
    assert sql.matching(_chunk_read) == -(
        -len(data) // CHUNK
    )  # each chunk once, not once per device


def test_a_bundle_over_a_quarter_of_the_cache_is_streamed_every_time(
    database: Database, record: Callable[[], Statements], tmp_path: Path
) -> None:
    store = DatabaseBundleStore(database, chunk_bytes=CHUNK, cache_bytes=600_000)
    path, sha = _bundle(tmp_path, 200_000, 2)  # over 150,000: never kept
    data = path.read_bytes()
    store.put(path, sha, len(data))
    sql = record()
    for _ in range(2):
        got: list[bytes] = []
        assert sql.during(lambda g=got: g.append(_read(store, sha, 5, len(data) - 5))) >= 2
        assert got == [data[5:]]


def test_the_least_recently_used_bundle_leaves_first_and_a_deleted_one_at_once(
    database: Database, record: Callable[[], Statements], tmp_path: Path
) -> None:
    store = DatabaseBundleStore(database, chunk_bytes=CHUNK, cache_bytes=1_000_000)
    shas = []
    for seed in range(5):  # 240,000 bytes each: four fit in 1,000,000 bytes, not five
        path, sha = _bundle(tmp_path, 240_000, 10 + seed)
        store.put(path, sha, 240_000)
        shas.append(sha)
    a, b, c, d, e = shas
    sql = record()
    for sha in (a, b, c, d, a):  # a is now the most recently used, b the least
        _read(store, sha, 0, 10)
    _read(store, e, 0, 10)  # b leaves
    for sha in (a, c, d, e):
        assert sql.during(lambda sha=sha: _read(store, sha, 0, 10)) == 0
    assert sql.during(lambda: _read(store, b, 0, 10)) >= 2
    store.delete(c)
    assert sql.during(lambda: _read(store, c, 0, 10)) >= 1  # gone from memory too
    assert _read(store, c, 0, 10) == b""


def test_downloads_over_http_read_the_database_once(
    database: Database, record: Callable[[], Statements], tokens: dict[str, str], tmp_path: Path
) -> None:
    app, data = _app_with_a_bundle(database, tmp_path)
    with serving(app) as url, httpx.Client(base_url=url) as client:
        auth = {"Authorization": f"Bearer {tokens['operator']}"}
        created = client.post("/api/v1/models", content=data, headers=auth).json()
        sql = record()

        def fetch(headers: dict[str, str] | None = None) -> httpx.Response:
            return client.get(created["download_url"], headers=headers)

        first = sql.during(fetch)
        resp = fetch()
        later = sql.during(fetch)
        part = fetch({"Range": "bytes=100-199"})
    assert resp.status_code == 200 and resp.content == data
    assert part.status_code == 206 and part.content == data[100:200]
    # Every download still looks the model up (its key, and whether it still exists); only
    # the first one reads the bundle's rows.
    assert later < first


def test_a_cached_bundle_is_answered_without_touching_its_rows(
    database: Database, record: Callable[[], Statements], tokens: dict[str, str], tmp_path: Path
) -> None:
    """Once a bundle is in memory and its model row remembered (``ModelRows``), a download
    (whole or a range) runs no SQL at all: its size comes from the cache, not from
    ``sum(length(data))`` over its chunks, and the row is not read again."""
    app, data = _app_with_a_bundle(database, tmp_path)
    n = len(data)
    ranges = {
        "bytes=0-0": (0, 0),
        "bytes=100-199": (100, 199),
        f"bytes={n - 10}-{n + 50}": (n - 10, n - 1),
        "bytes=-10": (n - 10, n - 1),
        f"bytes={CHUNK - 1}-": (CHUNK - 1, n - 1),
    }
    with serving(app) as url, httpx.Client(base_url=url) as client:
        auth = {"Authorization": f"Bearer {tokens['operator']}"}
        created = client.post("/api/v1/models", content=data, headers=auth).json()
        client.get(created["download_url"]).raise_for_status()  # fills the cache
        sql = record()
        whole = client.get(created["download_url"])
        parts = {
            spec: client.get(created["download_url"], headers={"Range": spec}) for spec in ranges
        }
        assert sql.matching(_on_chunks) == 0, "a cached bundle was looked up in bundle_chunks"
        assert sql.count == 0, "a remembered model row was read again"
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-length"] == str(n)
    assert whole.headers["etag"] == f'"{created["sha256"]}"'
    for spec, (first, last) in ranges.items():
        part = parts[spec]
        assert part.status_code == 206, spec
        assert part.content == data[first : last + 1], spec
        assert part.headers["content-range"] == f"bytes {first}-{last}/{n}", spec
        assert part.headers["content-length"] == str(last - first + 1), spec
