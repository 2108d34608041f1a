"""``edgefleet keys`` and ``edgefleet model``: package, sign, verify, push, list, show
against a real controller API (uvicorn on loopback)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from controller.api import create_app
from controller.blobstore import BlobStore, ModelHosting
from controller.db.session import Database
from controller.fleet.tokens import Role, create_token
from tests import images
from tests.controller.conftest import Cli, Clock, serving

MANIFEST = (
    Path(__file__).resolve().parents[2] / "inference" / "assets" / "blazeface-short-int8.json"
)


@pytest.fixture
def api(database: Database, clock: Clock, tmp_path: Path) -> Iterator[str]:
    app = create_app(db=database, clock=clock)
    app.state.models = ModelHosting(
        blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=10_000_000
    )
    with serving(app) as url:
        yield url


def _token(database: Database, role: Role) -> str:
    with database.begin() as conn:
        _, token = create_token(conn, name=role, role=role, now=0)
    return token


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_operator_packages_signs_verifies_pushes_lists_and_shows_a_model(
    tmp_path: Path, api: str, database: Database
) -> None:
    cli = Cli(tmp_path)
    keys = tmp_path / "keys"
    generated = cli("keys", "generate", "--out", str(keys))
    assert generated.exit_code == 0, generated.output
    assert "key id:" in generated.stdout
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    again = cli("keys", "generate", "--out", str(keys))
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.stderr

    png = tmp_path / "astronaut.png"
    rgb = images.astronaut()
    cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    efb = tmp_path / "face-1.0.0.efb"
    packaged = cli(
        "model", "package", str(MANIFEST), "--name", "face", "--version", "1.0.0",
        "--golden", str(png), "--latency-budget-ms", "40", "--out", str(efb),
    )  # fmt: skip
    assert packaged.exit_code == 0, packaged.output
    assert "golden golden/astronaut.png: face 0.90" in packaged.stdout

    signed = cli("model", "sign", str(efb), "--key", str(keys / "signing.key"))
    assert signed.exit_code == 0, signed.output
    verified = cli("model", "verify", str(efb), "--pub", str(keys / "signing.pub"))
    assert verified.exit_code == 0, verified.output
    assert "signature ok" in verified.stdout
    cli("keys", "generate", "--out", str(tmp_path / "other"))
    wrong = cli("model", "verify", str(efb), "--pub", str(tmp_path / "other" / "signing.pub"))
    assert wrong.exit_code == 1
    assert "does not verify with any trusted key" in wrong.stderr

    cli.env["EDGEFLEET_URL"] = api
    cli.env["EDGEFLEET_TOKEN"] = _token(database, "viewer")
    refused = cli("model", "push", str(efb))
    assert refused.exit_code == 1
    assert "403" in refused.stderr and "needs operator" in refused.stderr

    cli.env["EDGEFLEET_TOKEN"] = _token(database, "operator")
    pushed = cli("model", "push", str(efb))
    assert pushed.exit_code == 0, pushed.output
    assert "uploaded face@1.0.0" in pushed.stdout
    duplicate = cli("model", "push", str(efb))
    assert duplicate.exit_code == 1
    assert "409" in duplicate.stderr and "face@1.0.0 already exists" in duplicate.stderr

    listed = cli.json("model", "list")
    assert [m["ref"] for m in listed] == ["face@1.0.0"]
    table = cli("model", "list")
    assert "face@1.0.0" in table.stdout and "1 model\n" in table.stdout
    shown = cli.json("model", "show", "face@1.0.0")
    assert shown["manifest"]["latency_budget_ms"] == 40.0
    newest = cli("model", "show", "face")
    assert newest.exit_code == 0, newest.output
    assert "golden/astronaut.png: face 0.90" in newest.stdout
    missing = cli("model", "show", "nope")
    assert missing.exit_code == 1 and "no model named 'nope'" in missing.stderr


def test_package_with_unreadable_golden_image_fails_clearly(tmp_path: Path) -> None:
    from controller.bundles import BundleError, package_model

    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")  # a PNG signature, no image
    with pytest.raises(BundleError, match=r"running the model locally.*cannot decode image"):
        package_model(MANIFEST, out=tmp_path / "x.efb", name="m", version="1", golden=[png])
    assert not (tmp_path / "x.efb").exists()
