"""Model bundles in S3-compatible storage (``models.storage = "s3"``) against a real server
process: ``moto_server``, an S3 *emulator* from PyPI (not AWS; see tests/s3_server.py).
Uploads land in the bucket, the download endpoint answers 307 to a presigned URL, a real
agent download follows it and resumes a cut transfer at the bucket, and
``edgefleet model migrate-storage --to s3`` copies the blob directory over, verified."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.ota.download import download
from common.backoff import Backoff
from controller.api import create_app
from controller.artifacts.database import DatabaseBundleStore
from controller.artifacts.s3 import S3BundleStore
from controller.blobstore import BlobStore, ModelHosting
from controller.bundles import package_model
from controller.config import parse_config
from controller.db.session import Database
from controller.fleet import registry
from controller.fleet.tokens import create_token
from tests.controller.conftest import Cli, Clock, serving
from tests.cutting_proxy import CuttingProxy
from tests.s3_server import MotoS3

MANIFEST = (
    Path(__file__).resolve().parents[2] / "inference" / "assets" / "blazeface-short-int8.json"
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with MotoS3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def bucket(s3: MotoS3) -> str:
    name = f"bundles-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("bundles")
    out = {}
    for version in ("1.0.0", "1.1.0"):
        out[version] = work / f"face-{version}.efb"
        package_model(MANIFEST, out=out[version], name="face", version=version)
    return out


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database.from_url(f"sqlite:///{tmp_path / 'controller.db'}")
    db.upgrade()
    yield db
    db.dispose()


@pytest.fixture
def operator(database: Database, clock: Clock) -> str:
    with database.begin() as conn:
        _, token = create_token(conn, name="op", role="operator", now=clock())
    return token


def store_for(s3: MotoS3, bucket: str, endpoint_url: str | None = None) -> S3BundleStore:
    cfg = parse_config(
        f'[models]\nstorage = "s3"\n{s3.config_toml(bucket, endpoint_url=endpoint_url)}'
    )
    return S3BundleStore.from_config(cfg.models.s3)


def serve(database: Database, clock: Clock, tmp_path: Path, store: S3BundleStore) -> Any:
    app = create_app(db=database, clock=clock)
    app.state.models = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=10_000_000, store=store
    )
    return serving(app)


def upload(url: str, token: str, path: Path) -> dict[str, str]:
    resp = httpx.post(
        f"{url}/api/v1/models",
        content=path.read_bytes(),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 201, resp.text
    created: dict[str, str] = resp.json()
    return created


def test_upload_goes_to_the_bucket_and_downloads_redirect_to_a_presigned_url(
    s3: MotoS3,
    bucket: str,
    database: Database,
    clock: Clock,
    operator: str,
    bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    data = bundles["1.0.0"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    with serve(database, clock, tmp_path, store_for(s3, bucket)) as url:
        created = upload(url, operator, bundles["1.0.0"])
        answer = httpx.get(url + created["download_url"], follow_redirects=False)
        dest = download(
            url + created["download_url"], tmp_path / f"{sha}.efb", sha256=sha, size=len(data)
        )
    key = f"edgefleet/bundles/sha256/{sha[:2]}/{sha}.efb"
    head = s3.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"sha256": sha}
    assert not (tmp_path / "blobs" / "sha256").exists()  # nothing on the controller's disk
    assert answer.status_code == 307
    location = answer.headers["location"]
    assert location.startswith(f"{s3.url}/{bucket}/{key}?")
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=900" in location
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["etag"] == f'"{sha}"'
    assert httpx.get(location).content == data  # the bytes come from the bucket
    assert dest.read_bytes() == data  # the agent followed the redirect


def test_a_cut_agent_download_resumes_at_the_bucket(
    s3: MotoS3,
    bucket: str,
    database: Database,
    clock: Clock,
    operator: str,
    bundles: dict[str, Path],
    tmp_path: Path,
) -> None:
    data = bundles["1.1.0"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    proxy = CuttingProxy(s3.port)  # the "S3 endpoint" devices reach, over a flaky link
    try:
        with serve(database, clock, tmp_path, store_for(s3, bucket, proxy.url)) as url:
            created = upload(url, operator, bundles["1.1.0"])
            proxy.heads.clear()
            proxy.cut_after.append(90_000)
            dest = download(
                url + created["download_url"],
                tmp_path / f"{sha}.efb",
                sha256=sha,
                size=len(data),
                backoff=Backoff(0.05, 0.1),
            )
    finally:
        proxy.close()
    assert dest.read_bytes() == data
    assert len(proxy.heads) == 2  # two GETs of presigned URLs at the bucket
    assert all(h.startswith(f"GET /{bucket}/") for h in proxy.heads)
    assert "range:" not in proxy.heads[0].lower()
    [resumed] = [line for line in proxy.heads[1].splitlines() if line.lower().startswith("range:")]
    assert 0 < int(resumed.split("=")[1].rstrip("-")) < 90_000


def test_migrate_storage_copies_blobs_to_s3_verified_and_reports_missing(
    s3: MotoS3, bucket: str, bundles: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n{s3.config_toml(bucket)}')
    db = Database.from_url(f"sqlite:///{tmp_path / 'data' / 'controller.db'}")
    db.upgrade()
    blobs = BlobStore(tmp_path / "data" / "blobs")
    shas = {}
    with db.begin() as conn:
        for version, path in bundles.items():
            data = path.read_bytes()
            shas[version] = sha = hashlib.sha256(data).hexdigest()
            blobs.put(path, sha, len(data))
            registry.add_model(
                conn, name="face", version=version, sha256=sha, size=len(data),
                runtime="tflite", manifest={}, signature=None, key_id=None, now=1.0,
            )  # fmt: skip
    db.dispose()
    cli = Cli(tmp_path / "home")
    first = cli("model", "migrate-storage", "--to", "s3", "--config", str(config))
    assert first.exit_code == 0, first.output
    assert "2 bundle(s): 2 copied" in first.output
    client = s3.client()
    for version, sha in shas.items():
        key = f"edgefleet/bundles/sha256/{sha[:2]}/{sha}.efb"
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha
        assert body == bundles[version].read_bytes()

    # From the bucket into the database (SQLite here): streamed down, hashed, read back.
    to_db = cli(
        "model", "migrate-storage", "--from", "s3", "--to", "database", "--config", str(config)
    )
    assert to_db.exit_code == 0, to_db.output
    assert "2 bundle(s): 2 copied" in to_db.output
    db = Database.from_url(f"sqlite:///{tmp_path / 'data' / 'controller.db'}")
    for version, sha in shas.items():
        data = bundles[version].read_bytes()
        assert b"".join(DatabaseBundleStore(db).read(sha, 0, len(data))) == data

    # A model whose bundle is in neither store is named, and the run fails.
    with db.begin() as conn:
        registry.add_model(
            conn, name="lost", version="1", sha256="ab" * 32, size=10, runtime="tflite",
            manifest={}, signature=None, key_id=None, now=2.0,
        )  # fmt: skip
    db.dispose()
    second = cli(
        "model", "migrate-storage", "--to", "s3", "--config", str(config), "--delete-source"
    )
    assert second.exit_code == 1, second.output
    assert "3 bundle(s): 0 copied (0.0 MiB), 2 already there, 1 missing; 2 source copies" in (
        second.output
    )
    assert "lost@1" in second.stderr
    assert not any(blobs.exists(sha) for sha in shas.values())


def test_s3_storage_config_is_checked() -> None:
    from controller.errors import ConfigError

    with pytest.raises(ConfigError, match=r"models.storage = \"s3\" needs models.s3.bucket"):
        parse_config('[models]\nstorage = "s3"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'bucket_name' in models\.s3"):
        parse_config('[models.s3]\nbucket_name = "x"\n')
    with pytest.raises(ConfigError, match=r"endpoint_url 'minio:9000'"):
        parse_config('[models.s3]\nendpoint_url = "minio:9000"\n')
    cfg = parse_config('[models]\nstorage = "s3"\n[models.s3]\nbucket = "b"\naccess_key_id = "k"\n')
    with pytest.raises(Exception, match="access_key_id and secret_access_key go together"):
        S3BundleStore.from_config(cfg.models.s3)


def test_default_storage_follows_the_database(tmp_path: Path) -> None:
    from controller.config import load_config

    pg = {"EDGEFLEET_DB_URL": "postgresql+psycopg://u@h/db"}
    assert load_config(env=pg).bundle_storage == "database"
    assert load_config(env={}).bundle_storage == "local"
    config = tmp_path / "c.toml"
    config.write_text('[models]\nstorage = "local"\n')
    assert load_config(config, env=pg).bundle_storage == "local"
    secret = {"EDGEFLEET_S3_SECRET_ACCESS_KEY": "s3cr3t"}
    assert load_config(env=secret).config.models.s3.secret_access_key == "s3cr3t"


def test_an_unreachable_bucket_fails_the_upload_with_503_and_stores_no_model(
    s3: MotoS3, database: Database, clock: Clock, operator: str, bundles: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    with serve(database, clock, tmp_path, store_for(s3, "no-such-bucket")) as url:
        resp = httpx.post(
            f"{url}/api/v1/models",
            content=bundles["1.0.0"].read_bytes(),
            headers={"Authorization": f"Bearer {operator}"},
        )
        listed = httpx.get(f"{url}/api/v1/models", headers={"Authorization": f"Bearer {operator}"})
    assert resp.status_code == 503
    assert "could not be stored" in resp.json()["detail"]
    assert "s3://no-such-bucket/edgefleet/bundles/" in resp.json()["detail"]
    assert listed.json()["models"] == []
