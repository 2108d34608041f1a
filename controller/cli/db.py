"""``edgefleet db upgrade``: database maintenance on the database directly."""

from __future__ import annotations

import click

from controller.cli.options import db_options, load_controller_config


@click.group()
def db() -> None:
    """Database maintenance (works on the database directly)."""


@db.command("upgrade")
@db_options
def db_upgrade(config_path: str | None, data_dir: str | None, db_url: str | None) -> None:
    """Apply the schema migrations (the controller also does this on start)."""
    from controller.db.session import Database, current_revision

    loaded = load_controller_config(config_path, data_dir, db_url)
    database = Database.from_url(loaded.database_url)
    try:
        database.upgrade()
        click.echo(f"database {database.url} is at revision {current_revision(database.engine)}")
    finally:
        database.dispose()
