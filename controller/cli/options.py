"""Options several command groups share (``--json``, the database options) and the
controller config and database that the database options name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def packaging_options(func: Any) -> Any:
    """``--runtime``, ``--golden`` and ``--latency-budget-ms``: what ``model package`` and
    ``model publish`` put in a bundle besides the model and its manifest."""
    func = click.option("--latency-budget-ms", type=float, help="Per-inference latency budget.")(
        func
    )
    func = click.option(
        "--golden",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False),
        help="PNG image whose detections become a golden sample (repeatable).",
    )(func)
    return click.option(
        "--runtime", type=click.Choice(["litert", "onnx"]), help="Override the runtime."
    )(func)


def db_options(func: Any) -> Any:
    """``--config``, ``--data-dir`` and ``--db``: a command that works on the database."""
    func = click.option(
        "--db", "db_url", help="Database URL (default: the config's, or SQLite in the data dir)."
    )(func)
    func = click.option(
        "--data-dir", type=click.Path(file_okay=False), help="Controller data directory."
    )(func)
    return click.option(
        "--config",
        "config_path",
        envvar="EDGEFLEET_CONFIG",
        type=click.Path(dir_okay=False),
        help="Controller config file (TOML).",
    )(func)


def load_controller_config(
    config_path: str | None, data_dir: str | None, db_url: str | None, **more: Any
) -> Any:
    """The controller config of the database options, with ``more`` overrides."""
    from controller.config import load_config

    overrides: dict[str, Any] = {
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "database.url": db_url,
    }
    overrides.update(more)
    return load_config(config_path, overrides=overrides)


def open_database(config_path: str | None, data_dir: str | None, db_url: str | None) -> Any:
    """The controller's database (migrated) named by the database options."""
    from controller.db.session import Database

    loaded = load_controller_config(config_path, data_dir, db_url)
    db = Database.from_url(loaded.database_url)
    db.upgrade()
    return db
