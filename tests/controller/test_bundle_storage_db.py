"""Model bundles kept in PostgreSQL (``models.storage = "database"``) over real HTTP: chunked
upload in the model's transaction, streamed download, Range (suffix, If-Range, 416), a real
agent download resuming after a cut connection, ``edgefleet model migrate-storage`` from the
blob directory, and a second controller process on the same database serving a bundle
uploaded through the first (no shared disk)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from agent.ota.download import download
from common.backoff import Backoff
from controller.api import create_app
from controller.artifacts.database import DatabaseBundleStore
from controller.blobstore import BlobStore, ModelHosting
from controller.bundles import package_model
from controller.db.models import bundle_chunks
from controller.db.session import Database
from controller.fleet import registry
from tests.broker import Mosquitto
from tests.controller.conftest import Cli, Clock, serving
from tests.controller.controller_proc import ControllerProcess
from tests.cutting_proxy import CuttingProxy

pytestmark = pytest.mark.postgres

MANIFEST = (
    Path(__file__).resolve().parents[2] / "inference" / "assets" / "blazeface-short-int8.json"
)
CHUNK = 65_536


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("bundles")
    out = {}
    for version in ("1.0.0", "1.1.0"):
        out[version] = work / f"face-{version}.efb"
        package_model(MANIFEST, out=out[version], name="face", version=version)
    return out


@pytest.fixture
def database(pg_url: str) -> Iterator[Database]:
    db = Database.from_url(pg_url)
    db.upgrade()
    yield db
    db.dispose()


@pytest.fixture
def client(database: Database, clock: Clock, tmp_path: Path) -> Iterator[httpx.Client]:
    app = create_app(db=database, clock=clock)
    app.state.models = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"),
        max_bundle_bytes=10_000_000,
        store=DatabaseBundleStore(database, chunk_bytes=CHUNK, cache_bytes=0),  # streamed
    )
    with serving(app) as url, httpx.Client(base_url=url) as c:
        yield c


def upload(c: httpx.Client, token: str, path: Path) -> dict[str, str]:
    resp = c.post(
        "/api/v1/models", content=path.read_bytes(), headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 201, resp.text
    created: dict[str, str] = resp.json()
    return created


def chunk_rows(database: Database, sha: str) -> tuple[int, int]:
    with database.connect() as conn:
        count, total = conn.execute(
            select(func.count(), func.sum(func.length(bundle_chunks.c.data))).where(
                bundle_chunks.c.sha256 == sha
            )
        ).one()
    return int(count), int(total or 0)


def test_upload_is_chunked_in_the_database_and_downloads_stream_back(
    client: httpx.Client,
    database: Database,
    tokens: dict[str, str],
    bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    data = bundles["1.0.0"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    created = upload(client, tokens["operator"], bundles["1.0.0"])
    assert created["sha256"] == sha
    assert len(data) > 2 * CHUNK
    assert chunk_rows(database, sha) == (-(-len(data) // CHUNK), len(data))
    assert not (tmp_path / "blobs" / "sha256").exists()  # nothing on this replica's disk
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []  # the staged upload is gone

    resp = client.get(created["download_url"])
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["etag"] == f'"{sha}"'
    assert resp.headers["content-length"] == str(len(data))
    assert resp.headers["accept-ranges"] == "bytes"
    again = client.get(created["download_url"], headers={"If-None-Match": f'"{sha}"'})
    assert again.status_code == 304


def test_a_model_reusing_a_stored_bundle_keeps_one_copy(
    client: httpx.Client, database: Database, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    data = bundles["1.0.0"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = DatabaseBundleStore(database, chunk_bytes=CHUNK)
    store.put(bundles["1.0.0"], sha, len(data))  # stored before (e.g. by migrate-storage)
    upload(client, tokens["operator"], bundles["1.0.0"])
    assert chunk_rows(database, sha) == (-(-len(data) // CHUNK), len(data))


def test_ranges_suffixes_if_range_and_unsatisfiable(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    data = bundles["1.0.0"].read_bytes()
    size = len(data)
    url = upload(client, tokens["operator"], bundles["1.0.0"])["download_url"]
    cases = {
        "bytes=0-99": (0, 99),
        f"bytes={CHUNK - 10}-{CHUNK + 9}": (CHUNK - 10, CHUNK + 9),  # across a chunk edge
        f"bytes={CHUNK}-{2 * CHUNK - 1}": (CHUNK, 2 * CHUNK - 1),  # exactly one chunk
        "bytes=100000-": (100_000, size - 1),
        "bytes=-500": (size - 500, size - 1),
        f"bytes=-{size + 10}": (0, size - 1),  # a suffix longer than the file: all of it
        f"bytes={size - 1}-{size + 100}": (size - 1, size - 1),
    }
    for header, (start, end) in cases.items():
        resp = client.get(url, headers={"Range": header})
        assert resp.status_code == 206, header
        assert resp.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert resp.content == data[start : end + 1], header
    for bad in (f"bytes={size}-", "bytes=-0", "bytes=5-2"):
        resp = client.get(url, headers={"Range": bad})
        assert resp.status_code == 416, bad
        assert resp.headers["content-range"] == f"bytes */{size}"
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    same = client.get(url, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert (same.status_code, same.content) == (206, data[10:20])
    changed = client.get(url, headers={"Range": "bytes=10-19", "If-Range": '"other"'})
    assert (changed.status_code, changed.content) == (200, data)


def test_an_agent_download_cut_midway_resumes_from_the_database(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path], tmp_path: Path
) -> None:
    data = bundles["1.0.0"].read_bytes()
    created = upload(client, tokens["operator"], bundles["1.0.0"])
    port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=[CHUNK + 5000])  # the first answer stops mid-chunk
    try:
        dest = download(
            proxy.url + created["download_url"],
            tmp_path / f"{created['sha256']}.efb",
            sha256=created["sha256"],
            size=len(data),
            backoff=Backoff(0.05, 0.1),
        )
    finally:
        proxy.close()
    assert dest.read_bytes() == data
    assert len(proxy.heads) == 2
    assert "range:" not in proxy.heads[0].lower()
    [resumed] = [line for line in proxy.heads[1].splitlines() if line.lower().startswith("range:")]
    offset = int(resumed.split("=")[1].rstrip("-"))
    assert CHUNK < offset < CHUNK + 5000  # resumed where the cut left it, not from 0


def test_migrate_storage_copies_blobs_into_the_database_verified(
    pg_url: str, database: Database, bundles: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[database]\nurl = "{pg_url}"\n'
        f'[models]\nstorage = "local"\nchunk_bytes = {CHUNK}\n'
    )
    blobs = BlobStore(tmp_path / "data" / "blobs")
    shas = {}
    with database.begin() as conn:
        for version, path in bundles.items():
            data = path.read_bytes()
            shas[version] = sha = hashlib.sha256(data).hexdigest()
            blobs.put(path, sha, len(data))
            for name in ("face", "face-copy"):  # two models sharing each bundle
                registry.add_model(
                    conn, name=name, version=version, sha256=sha, size=len(data),
                    runtime="tflite", manifest={}, signature=None, key_id=None, now=1.0,
                )  # fmt: skip
    cli = Cli(tmp_path / "home")
    first = cli("model", "migrate-storage", "--to", "database", "--config", str(config))
    assert first.exit_code == 0, first.output
    assert "2 bundle(s): 2 copied" in first.output
    assert "0 missing" in first.output
    assert 'next: set models.storage = "database"' in first.output
    store = DatabaseBundleStore(database)
    for version, sha in shas.items():
        data = bundles[version].read_bytes()
        assert b"".join(store.read(sha, 0, len(data))) == data
        assert blobs.exists(sha)  # kept without --delete-source

    second = cli(
        "model", "migrate-storage", "--to", "database", "--config", str(config), "--delete-source"
    )
    assert second.exit_code == 0, second.output
    assert "2 bundle(s): 0 copied (0.0 MiB), 2 already there, 0 missing; 2 source copies" in (
        second.output
    )
    assert not any(blobs.exists(sha) for sha in shas.values())
    assert chunk_rows(database, shas["1.0.0"])[1] == len(bundles["1.0.0"].read_bytes())


def test_a_second_controller_on_the_same_database_serves_the_bundle(
    pg_url: str,
    database: Database,
    tokens: dict[str, str],
    bundles: dict[str, Path],
    mosquitto: Mosquitto,
    tmp_path: Path,
) -> None:
    for replica in ("a", "b"):
        (tmp_path / replica).mkdir()
    first = ControllerProcess(tmp_path / "a", pg_url, mosquitto)
    second = ControllerProcess(tmp_path / "b", pg_url, mosquitto)
    data = bundles["1.1.0"].read_bytes()
    try:
        first.start()
        second.start()
        with httpx.Client(base_url=first.url) as c:
            created = upload(c, tokens["operator"], bundles["1.1.0"])
        with httpx.Client(base_url=second.url) as c:
            whole = c.get(created["download_url"])
            part = c.get(created["download_url"], headers={"Range": "bytes=-1000"})
    finally:
        first.stop()
        second.stop()
    assert whole.status_code == 200
    assert whole.content == data
    assert (part.status_code, part.content) == (206, data[-1000:])
    for replica in ("a", "b"):  # neither replica kept the bundle on its disk
        assert not list((tmp_path / replica / "data").rglob("*.efb"))


def test_a_bundle_not_migrated_yet_is_served_from_the_blob_directory(
    client: httpx.Client, database: Database, bundles: dict[str, Path], tmp_path: Path
) -> None:
    data = bundles["1.0.0"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    BlobStore(tmp_path / "blobs").put(bundles["1.0.0"], sha, len(data))  # before the upgrade
    with database.begin() as conn:
        row = registry.add_model(
            conn, name="face", version="1.0.0", sha256=sha, size=len(data), runtime="tflite",
            manifest={}, signature=None, key_id=None, now=1.0,
        )  # fmt: skip
    url = f"/api/v1/models/face/1.0.0/bundle?key={row.download_key}"
    assert chunk_rows(database, sha) == (0, 0)
    assert client.get(url).content == data
    tail = client.get(url, headers={"Range": "bytes=-100"})
    assert (tail.status_code, tail.content) == (206, data[-100:])
    (tmp_path / "blobs" / "sha256" / sha[:2] / f"{sha}.efb").unlink()
    gone = client.get(url)
    assert gone.status_code == 410
    assert "edgefleet model migrate-storage" in gone.json()["detail"]


def test_the_console_reads_bundle_members_from_the_database(
    database: Database, bundles: dict[str, Path], tmp_path: Path
) -> None:
    import tarfile

    from controller.console.pages_models import _golden_bytes

    path = bundles["1.1.0"]
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = DatabaseBundleStore(database, chunk_bytes=CHUNK)
    store.put(path, sha, len(data))
    hosting = ModelHosting(blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=1, store=store)
    with database.begin() as conn:
        m = registry.add_model(
            conn, name="face", version="1.1.0", sha256=sha, size=len(data), runtime="tflite",
            manifest={}, signature=None, key_id=None, now=1.0,
        )  # fmt: skip
    with tarfile.open(path) as tar:
        f = tar.extractfile("manifest.json")
        assert f is not None
        expected = f.read()
    assert _golden_bytes(hosting, m, "manifest.json") == expected
    assert _golden_bytes(hosting, m, "no-such-member.png") is None
