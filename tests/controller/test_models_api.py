"""Models API over real HTTP on SQLite and PostgreSQL: upload checks, listing, and bundle
downloads with Range, ETag and the per-bundle download key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import pytest

from controller.api import create_app
from controller.api.models import ModelRows
from controller.blobstore import BlobStore, ModelHosting
from controller.bundles import package_model, sign_bundle
from controller.db.session import Database
from controller.keys import generate_keys, load_private_key, load_public_key
from protocol.bundle import key_id
from tests import images
from tests.controller.conftest import Clock, serving
from tests.controller.sql_statements import Statements

MANIFEST = (
    Path(__file__).resolve().parents[2] / "inference" / "assets" / "blazeface-short-int8.json"
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two signed versions and one unsigned one of the shipped int8 model, plus the key."""
    work = tmp_path_factory.mktemp("models")
    png = work / "astronaut.png"
    rgb = images.astronaut()
    cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    generate_keys(work / "keys")
    key = load_private_key(work / "keys" / "signing.key")
    out: dict[str, Path] = {"pub": work / "keys" / "signing.pub"}
    for version, golden in (("1.0.0", [png]), ("1.1.0", [])):
        path = work / f"face-{version}.efb"
        package_model(MANIFEST, out=path, name="face", version=version, golden=golden)
        sign_bundle(path, key)
        out[version] = path
    out["unsigned"] = work / "face-2.0.0.efb"
    package_model(MANIFEST, out=out["unsigned"], name="face", version="2.0.0")
    return out


def _serve(database: Database, clock: Clock, hosting: ModelHosting) -> Iterator[httpx.Client]:
    app = create_app(db=database, clock=clock)
    app.state.models = hosting
    with serving(app) as url, httpx.Client(base_url=url) as c:
        yield c


@pytest.fixture
def client(database: Database, clock: Clock, tmp_path: Path) -> Iterator[httpx.Client]:
    hosting = ModelHosting(blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=10_000_000)
    yield from _serve(database, clock, hosting)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def push(c: httpx.Client, token: str, path: Path) -> httpx.Response:
    return c.post("/api/v1/models", content=path.read_bytes(), headers=auth(token))


def test_push_then_list_and_show_the_model(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path], tmp_path: Path
) -> None:
    data = bundles["1.0.0"].read_bytes()
    resp = push(client, tokens["operator"], bundles["1.0.0"])
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["ref"] == "face@1.0.0"
    assert created["sha256"] == hashlib.sha256(data).hexdigest()
    assert created["size"] == len(data)
    assert created["signature"] and created["key_id"] is None  # no trusted keys configured
    blob = tmp_path / "blobs" / "sha256" / created["sha256"][:2] / f"{created['sha256']}.efb"
    assert blob.read_bytes() == data
    assert push(client, tokens["admin"], bundles["1.1.0"]).status_code == 201

    listed = client.get("/api/v1/models", headers=auth(tokens["viewer"])).json()["models"]
    assert [m["ref"] for m in listed] == ["face@1.1.0", "face@1.0.0"]
    shown = client.get("/api/v1/models/face/1.0.0", headers=auth(tokens["viewer"])).json()
    [golden] = shown["manifest"]["golden"]
    assert golden["expected"][0][0] == "face"
    assert golden["expected"][0][1] == pytest.approx(0.905, abs=0.01)
    missing = client.get("/api/v1/models/face/9.9.9", headers=auth(tokens["viewer"]))
    assert missing.status_code == 404
    assert "edgefleet model list" in missing.json()["detail"]


def test_duplicate_push_is_refused_with_409(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    assert push(client, tokens["operator"], bundles["1.0.0"]).status_code == 201
    again = push(client, tokens["operator"], bundles["1.0.0"])
    assert again.status_code == 409
    assert "face@1.0.0 already exists" in again.json()["detail"]


def test_viewer_token_cannot_push(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    resp = push(client, tokens["viewer"], bundles["1.0.0"])
    assert resp.status_code == 403
    assert "needs operator" in resp.json()["detail"]
    assert client.get("/api/v1/models", headers=auth(tokens["viewer"])).json()["models"] == []


def test_damaged_or_oversized_uploads_are_rejected(
    database: Database,
    clock: Clock,
    tmp_path: Path,
    tokens: dict[str, str],
    bundles: dict[str, Path],
) -> None:
    data = bundles["1.0.0"].read_bytes()
    hosting = ModelHosting(blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=len(data) - 1)
    for c in _serve(database, clock, hosting):
        resp = push(c, tokens["operator"], bundles["1.0.0"])
        assert resp.status_code == 413
        assert "max_bundle_bytes" in resp.json()["detail"]
        bad = tmp_path / "bad.efb"
        bad.write_bytes(data[:5000])
        resp = push(c, tokens["operator"], bad)
        assert resp.status_code == 422
        assert resp.json()["detail"].startswith("bundle rejected:")
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []  # temp uploads cleaned up


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_trusted_keys_require_a_signature_that_verifies(
    database: Database,
    clock: Clock,
    tmp_path: Path,
    tokens: dict[str, str],
    bundles: dict[str, Path],
) -> None:
    trusted = load_public_key(bundles["pub"])
    _, other_pub, _ = generate_keys(tmp_path / "other")
    hosting = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"),
        max_bundle_bytes=10_000_000,
        trusted_keys=[trusted],
    )
    for c in _serve(database, clock, hosting):
        unsigned = push(c, tokens["operator"], bundles["unsigned"])
        assert unsigned.status_code == 422
        assert "not signed" in unsigned.json()["detail"]
        ok = push(c, tokens["operator"], bundles["1.0.0"])
        assert ok.status_code == 201
        assert ok.json()["key_id"] == key_id(trusted)
    hosting = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"),
        max_bundle_bytes=10_000_000,
        trusted_keys=[load_public_key(other_pub)],
    )
    for c in _serve(database, clock, hosting):
        wrong = push(c, tokens["operator"], bundles["1.1.0"])
        assert wrong.status_code == 422
        assert "does not verify with any trusted key" in wrong.json()["detail"]


def test_bundle_download_supports_range_etag_and_the_download_key(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    data = bundles["1.0.0"].read_bytes()
    size = len(data)
    created = push(client, tokens["operator"], bundles["1.0.0"]).json()
    url = created["download_url"]  # carries ?key=...: no token needed
    etag = f'"{created["sha256"]}"'

    full = client.get(url)
    assert full.status_code == 200
    assert full.content == data
    assert full.headers["etag"] == etag
    assert full.headers["accept-ranges"] == "bytes"

    first = client.get(url, headers={"Range": "bytes=0-99"})
    assert first.status_code == 206
    assert first.content == data[:100]
    assert first.headers["content-range"] == f"bytes 0-99/{size}"

    rest = client.get(url, headers={"Range": "bytes=1000-"})
    assert rest.status_code == 206
    assert rest.content == data[1000:]
    assert rest.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"

    suffix = client.get(url, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206
    assert suffix.content == data[-10:]

    for bad in (f"bytes={size}-", "bytes=50-10", "items=0-1"):
        unsat = client.get(url, headers={"Range": bad})
        assert unsat.status_code == 416, bad
        assert unsat.headers["content-range"] == f"bytes */{size}"

    cached = client.get(url, headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    changed = client.get(url, headers={"If-None-Match": '"something-else"'})
    assert changed.status_code == 200


def test_bundle_download_without_key_needs_a_viewer_token(
    client: httpx.Client, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    push(client, tokens["operator"], bundles["1.0.0"])
    plain = "/api/v1/models/face/1.0.0/bundle"
    assert client.get(plain).status_code == 401
    assert client.get(plain + "?key=guessed").status_code == 401
    with_token = client.get(plain, headers=auth(tokens["viewer"]))
    assert with_token.status_code == 200
    assert with_token.content == bundles["1.0.0"].read_bytes()


def _model_select(statement: str) -> bool:
    return statement.lstrip().upper().startswith("SELECT") and "FROM models" in statement


def test_downloads_of_a_model_read_its_row_once(
    client: httpx.Client, database: Database, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    """A rollout's devices fetch the same bundle thousands of times: the model's row is read
    from the database once (versions are immutable), keys are still checked every time, and
    a version not stored yet is not remembered as missing."""
    url = push(client, tokens["operator"], bundles["1.0.0"]).json()["download_url"]
    missing = "/api/v1/models/face/1.1.0/bundle"
    with Statements(database) as sql:
        for _ in range(5):
            assert client.get(url).status_code == 200
        assert client.get(url.replace("key=", "key=x")).status_code == 401
        assert sql.matching(_model_select) == 1, sql.seen
        assert client.get(missing, headers=auth(tokens["viewer"])).status_code == 404
        created = push(client, tokens["operator"], bundles["1.1.0"]).json()
        assert client.get(created["download_url"]).status_code == 200


def test_remembered_model_rows_expire_and_are_bounded(
    client: httpx.Client, database: Database, tokens: dict[str, str], bundles: dict[str, Path]
) -> None:
    for version in ("1.0.0", "1.1.0"):
        push(client, tokens["operator"], bundles[version])
    now = [0.0]
    rows = ModelRows(ttl_s=10.0, size=1, clock=lambda: now[0])
    with Statements(database) as sql:
        found = rows.get(database, "face", "1.0.0")
        assert found is not None and found.ref == "face@1.0.0"
        assert rows.get(database, "face", "1.0.0") is found
        assert sql.matching(_model_select) == 1
        assert rows.get(database, "face", "1.1.0") is not None  # the only slot: 1.0.0 goes
        assert rows.get(database, "face", "1.0.0") is not None
        assert sql.matching(_model_select) == 3
        now[0] = 10.5  # past the TTL
        assert rows.get(database, "face", "1.0.0") is not None
        assert rows.get(database, "face", "9.9.9") is None
        assert rows.get(database, "face", "9.9.9") is None
        assert sql.matching(_model_select) == 6
