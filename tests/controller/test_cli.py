"""The operator CLI on the database (bootstrap commands) and its error output."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from controller.cli import main
from controller.db.session import Database, current_revision, head_revision
from controller.fleet.tokens import TOKEN_PREFIX, verify_token
from tests.broker import free_port
from tests.controller.conftest import Cli


def test_db_upgrade_and_tokens_create_work_without_a_token(db_url: str, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    upgraded = cli("db", "upgrade", "--db", db_url)
    assert upgraded.exit_code == 0 and f"revision {head_revision()}" in upgraded.stdout
    created = cli.json("tokens", "create", "--role", "admin", "--name", "first", "--db", db_url)
    assert created["role"] == "admin" and created["token"].startswith(TOKEN_PREFIX)
    db = Database.from_url(db_url)
    try:
        assert current_revision(db.engine) == head_revision()
        with db.begin() as conn:
            info = verify_token(conn, created["token"], now=0)
        assert info is not None and info.name == "first"
    finally:
        db.dispose()


def test_tokens_list_and_revoke_directly_on_the_database(db_url: str, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    first = cli.json("tokens", "create", "--role", "viewer", "--db", db_url)
    cli.json("tokens", "create", "--role", "operator", "--db", db_url)
    listed = cli.json("tokens", "list", "--db", db_url)
    assert [t["role"] for t in listed] == ["viewer", "operator"]
    assert all("token" not in t for t in listed)
    revoked = cli("tokens", "revoke", str(first["id"]), "--db", db_url)
    assert revoked.exit_code == 0
    assert [t["role"] for t in cli.json("tokens", "list", "--db", db_url)] == ["operator"]
    again = cli("tokens", "revoke", str(first["id"]), "--db", db_url)
    assert again.exit_code == 1
    assert again.stderr.startswith("error: no active token with id")


def test_tokens_create_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    created = cli.json("tokens", "create", "--role", "admin", "--data-dir", str(tmp_path / "d"))
    assert created["name"] == "admin"
    assert (tmp_path / "d" / "controller.db").is_file()


def test_unreachable_controller_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("--url", url, "--token", "x", "devices", "list")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: cannot reach the controller at {url}")
    assert "edgefleet controller serve" in lines[0]
    verbose = cli("-v", "--url", url, "--token", "x", "devices", "list")
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr


def test_cli_config_file_supplies_url_and_rejects_unknown_keys(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    conf = tmp_path / "edgefleet" / "cli.toml"
    conf.parent.mkdir()
    conf.write_text(f'url = "{url}"\ntoken = "t"\n')
    result = cli("devices", "list")
    assert result.exit_code == 1 and url in result.stderr
    conf.write_text('urll = "x"\n')
    bad = cli("devices", "list")
    assert bad.exit_code == 1 and "unknown field `urll`" in bad.stderr
    assert "only the keys 'url', 'token', 'ca_file'" in bad.stderr


def test_bad_controller_config_names_the_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[ingest]\nbatch = 3\n")
    result = CliRunner().invoke(main, ["db", "upgrade", "--config", str(config)])
    assert result.exit_code == 1
    assert "unknown key 'batch' in ingest" in result.stderr


def test_json_output_of_tokens_create_is_parseable_by_scripts(tmp_path: Path) -> None:
    result = Cli(tmp_path)(
        "tokens", "create", "--role", "viewer", "--db", f"sqlite:///{tmp_path}/x.db", "--json"
    )
    assert set(json.loads(result.stdout)) == {"id", "name", "role", "token"}
