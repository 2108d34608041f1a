"""``edgefleet tokens create|list|revoke``: API tokens.

``create`` works on the database directly, so the first admin token can be made without
one; ``list`` and ``revoke`` use the API, or the database with --db/--config/--data-dir.
"""

from __future__ import annotations

import time

import click

from controller.cli.options import db_options, json_option, open_database
from controller.cli.output import ago, escape, make_console, print_json
from controller.cli.settings import cli_state
from controller.errors import ControllerError


@click.group()
def tokens() -> None:
    """API tokens: create (on the database), list and revoke (API, or --db/--config)."""


@tokens.command("create")
@db_options
@click.option(
    "--role", type=click.Choice(["viewer", "operator", "admin"]), required=True, help="Token role."
)
@click.option("--name", default=None, help="A name to recognise the token [default: ROLE].")
@json_option
def tokens_create(
    config_path: str | None,
    data_dir: str | None,
    db_url: str | None,
    role: str,
    name: str | None,
    as_json: bool,
) -> None:
    """Create a token on the controller's database and print it (shown only once)."""
    from controller.fleet.tokens import create_token

    database = open_database(config_path, data_dir, db_url)
    try:
        with database.begin() as conn:
            info, token = create_token(
                conn,
                name=name or role,
                role=role,  # type: ignore[arg-type]
                now=time.time(),
            )
    finally:
        database.dispose()
    if as_json:
        print_json({"id": info.id, "name": info.name, "role": info.role, "token": token})
        return
    click.echo(token)
    click.echo(
        f"created {info.role} token {info.name!r} (id {info.id}); it is shown only once: "
        'export EDGEFLEET_TOKEN=... or put token = "..." in ~/.config/edgefleet/cli.toml',
        err=True,
    )


def _direct(config_path: str | None, data_dir: str | None, db_url: str | None) -> bool:
    return any((config_path, data_dir, db_url))


@tokens.command("list")
@db_options
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@json_option
@click.pass_context
def tokens_list(
    ctx: click.Context,
    config_path: str | None,
    data_dir: str | None,
    db_url: str | None,
    include_revoked: bool,
    as_json: bool,
) -> None:
    """List tokens (admin token via the API, or directly with --db/--config/--data-dir)."""
    if _direct(config_path, data_dir, db_url):
        from dataclasses import asdict

        from controller.fleet.tokens import list_tokens

        database = open_database(config_path, data_dir, db_url)
        try:
            with database.connect() as conn:
                rows = [asdict(t) for t in list_tokens(conn, include_revoked=include_revoked)]
        finally:
            database.dispose()
    else:
        with cli_state(ctx).client() as client:
            rows = client.tokens(include_revoked=include_revoked)
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table("ID", "NAME", "ROLE", "PREFIX", "CREATED", "LAST USED", "REVOKED")
    for t in rows:
        table.add_row(
            str(t["id"]),
            escape(t["name"]),
            t["role"],
            t["prefix"] + "…",
            ago(t["created_at"]),
            ago(t["last_used_at"]),
            ago(t["revoked_at"]) if t["revoked_at"] else "",
        )
    make_console().print(table)


@tokens.command("revoke")
@db_options
@click.argument("token_id", type=int)
@click.pass_context
def tokens_revoke(
    ctx: click.Context,
    config_path: str | None,
    data_dir: str | None,
    db_url: str | None,
    token_id: int,
) -> None:
    """Revoke a token by id (see `tokens list`)."""
    if _direct(config_path, data_dir, db_url):
        from controller.fleet.tokens import revoke_token

        database = open_database(config_path, data_dir, db_url)
        try:
            with database.begin() as conn:
                done = revoke_token(conn, token_id, now=time.time())
        finally:
            database.dispose()
        if not done:
            raise ControllerError(
                f"no active token with id {token_id}; `edgefleet tokens list` shows them"
            )
    else:
        with cli_state(ctx).client() as client:
            client.revoke_token(token_id)
    click.echo(f"revoked token {token_id}")
