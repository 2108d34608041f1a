"""``edgefleet model publish``: package + sign + push in one step, lineage in the signed
manifest, and one exit code per outcome, against a real controller API (uvicorn on
loopback, SQLite) that trusts one signing key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.api import create_app
from controller.blobstore import BlobStore, ModelHosting
from controller.cli import publish
from controller.db.session import Database
from controller.fleet.tokens import create_token
from protocol import decode_manifest, encode_manifest
from tests.controller.conftest import NOWHERE, Cli, Clock, serving

ASSETS = Path(__file__).resolve().parents[2] / "inference" / "assets"
MANIFEST = ASSETS / "blazeface-short-int8.json"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: what is tested here is the CLI, not the database."""
    return f"sqlite:///{tmp_path / 'controller.db'}"


def _key_file(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture
def trusted() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def api(
    database: Database, clock: Clock, tmp_path: Path, trusted: Ed25519PrivateKey
) -> Iterator[str]:
    app = create_app(db=database, clock=clock)
    app.state.models = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"),
        max_bundle_bytes=10_000_000,
        trusted_keys=[trusted.public_key()],
    )
    with serving(app) as url:
        yield url


def _token(database: Database, role: str) -> str:
    with database.begin() as conn:
        _, token = create_token(conn, name=role, role=role, now=0)  # type: ignore[arg-type]
    return token


@pytest.fixture
def cli(tmp_path: Path, api: str, database: Database, trusted: Ed25519PrivateKey) -> Cli:
    c = Cli(tmp_path, url=api, token=_token(database, "operator"))
    c.env[publish.KEY_FILE_ENV] = str(_key_file(tmp_path / "signing.key", trusted))
    c.env[publish.KEY_ENV] = None
    return c


LINEAGE = (
    "--source-commit", "3f2c1e9a0b",
    "--training-data", "s3://datasets/faces/v7",
    "--metric", "map50=0.71", "--metric", "eval/recall=0.9",
    "--label", "pipeline=https://ci.example.com/run/42",
)  # fmt: skip


def test_publish_packages_signs_and_uploads_with_lineage_shown_by_show_and_the_api(
    cli: Cli, tmp_path: Path, trusted: Ed25519PrivateKey
) -> None:
    out = tmp_path / "kept.efb"
    done = cli("model", "publish", str(MANIFEST), "--version", "1.2.0", *LINEAGE, "--out", str(out))
    assert done.exit_code == publish.EXIT_PUBLISHED, done.output
    assert "uploaded blazeface-short-int8@1.2.0" in done.stdout
    assert "signed, key" in done.stdout  # the controller verified it with its trusted key
    expected = {
        "source_commit": "3f2c1e9a0b",
        "training_data": "s3://datasets/faces/v7",
        "metrics": {"map50": 0.71, "eval/recall": 0.9},
        "labels": {"pipeline": "https://ci.example.com/run/42"},
    }
    shown = cli.json("model", "show", "blazeface-short-int8@1.2.0")
    assert shown["lineage"] == expected
    assert shown["manifest"]["lineage"] == expected
    human = cli("model", "show", "blazeface-short-int8@1.2.0")
    assert human.exit_code == 0, human.output
    for text in ("3f2c1e9a0b", "s3://datasets/faces/v7", "map50", "0.71", "ci.example.com"):
        assert text in human.stdout, human.stdout
    body = httpx.get(
        f"{cli.env['EDGEFLEET_URL']}/api/v1/models/blazeface-short-int8/1.2.0",
        headers={"Authorization": f"Bearer {cli.env['EDGEFLEET_TOKEN']}"},
    ).json()
    assert body["lineage"] == expected
    # The lineage is inside the signed bytes: the kept bundle verifies with the public key.
    pub = tmp_path / "signing.pub"
    pub.write_bytes(
        trusted.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verified = cli("model", "verify", str(out), "--pub", str(pub))
    assert verified.exit_code == 0, verified.output


def test_lineage_in_the_manifest_merges_with_the_options_and_pem_env_key_works(
    cli: Cli, tmp_path: Path, trusted: Ed25519PrivateKey
) -> None:
    raw = json.loads(MANIFEST.read_text())
    raw["lineage"] = {"training_data": "faces-v6", "metrics": {"map50": 0.5, "f1": 0.6}}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(raw))
    (tmp_path / raw["model"]).write_bytes((ASSETS / raw["model"]).read_bytes())
    pem = _key_file(tmp_path / "k", trusted).read_text()
    cli.env[publish.KEY_FILE_ENV] = None
    cli.env[publish.KEY_ENV] = pem
    done = cli("model", "publish", str(manifest), "--name", "face", "--metric", "map50=0.8")
    assert done.exit_code == 0, done.output
    shown = cli.json("model", "show", "face@1.0.0")
    assert shown["lineage"] == {
        "source_commit": None,
        "training_data": "faces-v6",
        "metrics": {"map50": 0.8, "f1": 0.6},
        "labels": {},
    }
    assert shown["key_id"] is not None


def test_a_model_file_finds_its_manifest_and_a_manifest_without_lineage_signs_as_before(
    cli: Cli,
) -> None:
    done = cli("model", "publish", str(ASSETS / "blazeface-short-int8.tflite"))
    assert done.exit_code == 0, done.output
    shown = cli.json("model", "show", "blazeface-short-int8@1.0.0")
    assert shown["lineage"] is None
    assert "lineage" not in shown["manifest"]
    # Manifests without lineage keep their canonical (signed) bytes: no "lineage": null.
    assert b"lineage" not in encode_manifest(decode_manifest(MANIFEST.read_bytes()))


def test_republish_exits_4_and_if_exists_skip_exits_0_only_when_identical(cli: Cli) -> None:
    args = ("model", "publish", str(MANIFEST), "--version", "2.0.0", *LINEAGE)
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == publish.EXIT_EXISTS, again.output
    assert "already exists" in again.stderr
    skipped = cli(*args, "--if-exists", "skip")
    assert skipped.exit_code == 0, skipped.output
    assert "already published with this content" in skipped.stdout
    other = cli(*args, "--metric", "map50=0.5", "--if-exists", "skip")
    assert other.exit_code == publish.EXIT_EXISTS, other.output
    assert "exists already with other content" in other.stderr


def test_untrusted_key_is_refused_with_exit_3(cli: Cli, tmp_path: Path) -> None:
    cli.env[publish.KEY_FILE_ENV] = str(
        _key_file(tmp_path / "other.key", Ed25519PrivateKey.generate())
    )
    refused = cli("model", "publish", str(MANIFEST))
    assert refused.exit_code == publish.EXIT_REFUSED, refused.output
    assert "upload refused (422)" in refused.stderr


def test_token_problems_exit_6_and_no_controller_exits_5(cli: Cli, database: Database) -> None:
    cli.env["EDGEFLEET_TOKEN"] = _token(database, "viewer")
    viewer = cli("model", "publish", str(MANIFEST))
    assert viewer.exit_code == publish.EXIT_AUTH, viewer.output
    assert "403" in viewer.stderr
    cli.env["EDGEFLEET_TOKEN"] = None
    anonymous = cli("model", "publish", str(MANIFEST))
    assert anonymous.exit_code == publish.EXIT_AUTH, anonymous.output
    cli.env["EDGEFLEET_URL"] = NOWHERE
    down = cli("model", "publish", str(MANIFEST))
    assert down.exit_code == publish.EXIT_UNREACHABLE, down.output
    assert "cannot reach the controller" in down.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--metric", "map50"), "use --metric NAME=VALUE"),
        (("--metric", "map50=high"), "must be a finite number"),
        (("--metric", "map50=nan"), "must be a finite number"),
        (("--metric", "a b=1"), "lineage:"),
        (("--label", "=x"), "use --label NAME=VALUE"),
        (("--source-commit", "x" * 129), "length <= 128"),
        (("--label", "k=line\nbreak"), "lineage:"),
        (("--version", "has space"), "invalid model version"),
    ],
)
def test_bad_lineage_and_input_exit_1_naming_the_problem(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    bad = cli("model", "publish", str(MANIFEST), *args)
    assert bad.exit_code == publish.EXIT_CONFIG, bad.output
    assert message in bad.stderr
    assert cli.json("model", "list") == []  # nothing was uploaded


def test_missing_key_model_or_manifest_exit_1_and_usage_errors_exit_2(
    cli: Cli, tmp_path: Path
) -> None:
    cli.env[publish.KEY_FILE_ENV] = None
    nokey = cli("model", "publish", str(MANIFEST))
    assert nokey.exit_code == publish.EXIT_CONFIG
    assert "no signing key" in nokey.stderr
    cli.env[publish.KEY_ENV] = "not a pem"
    badpem = cli("model", "publish", str(MANIFEST))
    assert badpem.exit_code == publish.EXIT_CONFIG
    assert "EDGEFLEET_SIGNING_KEY is not an unencrypted PKCS#8 PEM" in badpem.stderr
    missing = cli("model", "publish", str(tmp_path / "nope.json"))
    assert missing.exit_code == publish.EXIT_CONFIG
    assert "nope.json not found" in missing.stderr
    lone = tmp_path / "lone.tflite"
    lone.write_bytes(b"x")
    alone = cli("model", "publish", str(lone))
    assert alone.exit_code == publish.EXIT_CONFIG
    assert "--manifest-template" in alone.stderr
    usage = cli("model", "publish", str(MANIFEST), "--bogus")
    assert usage.exit_code == publish.EXIT_USAGE


def test_exit_codes_are_documented_in_help_and_docs() -> None:
    text = Cli(Path("."))("model", "publish", "--help").stdout
    docs = (Path(__file__).resolve().parents[2] / "docs" / "controller.md").read_text()
    for code in range(7):
        assert f"  {code}  " in text
        assert f"| {code} |" in docs


def test_lineage_bounds_accept_the_limits_and_refuse_past_them() -> None:
    from protocol import ProtocolError
    from protocol.manifest import LINEAGE_MAX_ENTRIES

    raw = json.loads(MANIFEST.read_text())
    most = {
        "source_commit": "c" * 128,
        "training_data": "d" * 512,
        "metrics": {f"m{i}": float(i) for i in range(LINEAGE_MAX_ENTRIES)},
        "labels": {f"k.{i}/x-y_z": "v" * 256 for i in range(LINEAGE_MAX_ENTRIES)},
    }
    assert (
        msgspec.to_builtins(decode_manifest(json.dumps({**raw, "lineage": most})).lineage) == most
    )
    for field, value in [
        ("training_data", "d" * 513),
        ("metrics", {f"m{i}": 1.0 for i in range(LINEAGE_MAX_ENTRIES + 1)}),
        ("labels", {"k": "v" * 257}),
        ("labels", {"-k": "v"}),
        ("source_commit", ""),
    ]:
        with pytest.raises(ProtocolError, match="lineage"):
            decode_manifest(json.dumps({**raw, "lineage": {**most, field: value}}))
