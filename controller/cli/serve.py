"""``edgefleet controller serve``: run the controller (migrations, MQTT ingestion, API)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from controller.cli.options import db_options, load_controller_config
from controller.cli.settings import cli_state


@click.group()
def controller() -> None:
    """Run the controller."""


@controller.command("serve")
@db_options
@click.option("--broker-url", help="Use this MQTT broker instead of the embedded one.")
@click.option("--bind", help="API listen address [default: 127.0.0.1].")
@click.option("--port", type=int, help="API port [default: 8080; 0 = any free port].")
@click.option(
    "--mqtt-port",
    type=int,
    help="Embedded broker port; a taken one is an error [default: 1883, or a free port "
    "(printed) when 1883 is taken; 0 = any free].",
)
@click.option(
    "--dev-token",
    is_flag=True,
    help="Create a fresh admin token named 'dev', print it and write it to DATA_DIR/dev-token.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A public key (PEM) model bundles must be signed with; repeat for more. Replaces "
    "models.trusted_keys; `devices enroll` gives it to devices ([ota] trusted_keys).",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.pass_context
def serve(
    ctx: click.Context,
    config_path: str | None,
    data_dir: str | None,
    db_url: str | None,
    broker_url: str | None,
    bind: str | None,
    port: int | None,
    mqtt_port: int | None,
    dev_token: bool,
    trusted_keys: tuple[str, ...],
    log_level: str | None,
) -> None:
    """Run the controller: migrations, MQTT ingestion, HTTP API (until Ctrl-C/SIGTERM).

    With no config it needs nothing: SQLite under ./edgefleet-data (or --data-dir) and an
    embedded MQTT broker on 127.0.0.1:1883 (a free port, printed, when 1883 is taken and
    --mqtt-port/embedded_broker.port is not set). `edgefleet devices enroll ID` then prints
    a ready agent config with the device's own login.
    """
    from controller.service import Controller

    loaded = load_controller_config(
        config_path,
        data_dir,
        db_url,
        **{
            "broker.url": broker_url,
            "api.bind": bind,
            "api.port": port,
            "embedded_broker.port": mqtt_port,
            "log_level": log_level,
            "models.trusted_keys": [str(Path(k).resolve()) for k in trusted_keys] or None,
        },
    )
    verbose = cli_state(ctx).verbose
    level = "debug" if verbose > 1 else loaded.config.log_level
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    ctl = Controller(loaded, mqtt_port_explicit=mqtt_port is not None)
    token: str | None = None
    if dev_token:
        ctl.migrate()
        token = ctl.create_dev_token()

    def ready(c: Controller) -> None:
        lines = [c.describe()]
        if token is not None:
            lines += [
                f"  admin token (dev): {token}",
                f"  (also in {c.loaded.data_dir / 'dev-token'})",
                f"  export EDGEFLEET_URL={c.api_url} EDGEFLEET_TOKEN={token}",
            ]
        else:
            lines.append(
                "  API tokens: `edgefleet tokens create --role admin"
                + (f" --data-dir {c.loaded.data_dir}" if c.config.database.url is None else "")
                + "`"
            )
        click.echo("\n".join(lines))
        click.echo("ready", err=False)
        sys.stdout.flush()

    ctl.serve(on_ready=ready)
