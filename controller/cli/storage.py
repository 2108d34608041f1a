"""``edgefleet model migrate-storage``: move bundles between stores (works on the database and
the stores directly, like ``edgefleet db upgrade``)."""

from __future__ import annotations

import click

from controller.cli.options import db_options, load_controller_config

_KINDS = click.Choice(["local", "database", "s3"])


@click.command("migrate-storage")
@click.option("--to", "target", required=True, type=_KINDS, help="Store to copy bundles into.")
@click.option(
    "--from",
    "source",
    type=_KINDS,
    default="local",
    show_default=True,
    help="Store to copy bundles from.",
)
@click.option(
    "--delete-source",
    is_flag=True,
    help="Remove each source copy once its copy in the target is verified.",
)
@db_options
def model_migrate_storage(
    target: str,
    source: str,
    delete_source: bool,
    config_path: str | None,
    data_dir: str | None,
    db_url: str | None,
) -> None:
    """Copy every model's bundle into another store (models.storage), sha256-verified.

    Safe to run again: bundles already in the target are checked and kept. Then set
    models.storage in the controller config to the target and restart the controllers.
    """
    from typing import cast

    from controller.artifacts import StorageKind
    from controller.artifacts.migrate import migrate_storage
    from controller.blobstore import open_store
    from controller.db.session import Database
    from controller.errors import ControllerError

    loaded = load_controller_config(config_path, data_dir, db_url)
    database = Database.from_url(loaded.database_url)
    try:
        database.upgrade()
        src = open_store(cast(StorageKind, source), loaded, database)
        dst = open_store(cast(StorageKind, target), loaded, database)
        click.echo(f"migrating bundles from {src.describe()} to {dst.describe()}")
        report = migrate_storage(
            database, src, dst, delete_source=delete_source, progress=click.echo
        )
    finally:
        database.dispose()
    mib = report.bytes_copied / 1024**2
    click.echo(
        f"{report.bundles} bundle(s): {report.copied} copied ({mib:.1f} MiB), "
        f"{report.already} already there, {len(report.missing)} missing; "
        f"{report.deleted} source cop{'y' if report.deleted == 1 else 'ies'} deleted"
    )
    if report.missing:
        raise ControllerError(
            f"{len(report.missing)} model(s) have no bundle in {source}: "
            f"{', '.join(report.missing)}; upload them again (new versions) or find the files"
        )
    if loaded.bundle_storage != target:
        click.echo(f'next: set models.storage = "{target}" in the controller config and restart')
