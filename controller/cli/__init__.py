"""``edgefleet``: the operator CLI and ``edgefleet controller serve``.

Most commands talk to the HTTP API (URL and token from --url/--token, EDGEFLEET_URL/
EDGEFLEET_TOKEN or the CLI config file ~/.config/edgefleet/cli.toml; for HTTPS the CA
from --ca-file/EDGEFLEET_CA_FILE/ca_file). ``tokens create``
and ``db upgrade`` work on the database directly, so the first admin token can be made
without one. Errors are one line (``error: ...``); ``-v`` adds the traceback.

This module holds the root group :func:`main` and puts the command groups together; each
group is a module of this package (none of them imports this one back).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from controller.cli import (
    db,
    devices,
    keys,
    model_init,
    models,
    publish,
    quantize,
    rollouts,
    security,
    serve,
    storage,
    tokens,
)
from controller.cli.extras import missing_module_message
from controller.cli.settings import CLI_CONFIG_ENV, CliState, cli_state
from controller.client import DEFAULT_URL
from controller.errors import ControllerError


class _Cli(click.Group):
    """Catches ControllerError: one line on stderr, exit code 1; traceback with -v."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ControllerError as err:
            state = ctx.find_object(CliState)
            if state is not None and state.verbose:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)
        except ImportError as err:  # an optional runtime (cv2, LiteRT, ...) is not installed
            message = missing_module_message(err)
            if message is None:
                raise
            state = ctx.find_object(CliState)
            if state is not None and state.verbose:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Show tracebacks and debug logs.")
@click.option("--url", envvar="EDGEFLEET_URL", help=f"Controller API URL [default: {DEFAULT_URL}].")
@click.option("--token", envvar="EDGEFLEET_TOKEN", help="API bearer token.")
@click.option(
    "--cli-config",
    envvar=CLI_CONFIG_ENV,
    help="CLI config file with url/token/ca_file [default: ~/.config/edgefleet/cli.toml].",
)
@click.option(
    "--ca-file",
    envvar="EDGEFLEET_CA_FILE",
    type=click.Path(dir_okay=False),
    help="Trust this CA certificate (PEM) for an https:// controller [default: system CAs].",
)
@click.option(
    "--client-cert",
    envvar="EDGEFLEET_CLIENT_CERT",
    type=click.Path(dir_okay=False),
    help="Client certificate (PEM) for a controller that requires one (mTLS).",
)
@click.option(
    "--client-key",
    envvar="EDGEFLEET_CLIENT_KEY",
    type=click.Path(dir_okay=False),
    help="The client certificate's private key (PEM).",
)
@click.version_option(package_name="edgefleet", prog_name="edgefleet")
@click.pass_context
def main(
    ctx: click.Context,
    verbose: int,
    url: str | None,
    token: str | None,
    cli_config: str | None,
    ca_file: str | None,
    client_cert: str | None,
    client_key: str | None,
) -> None:
    """edgefleet: fleet controller and operator CLI."""
    state = cli_state(ctx)
    state.verbose, state.url, state.token, state.cli_config = verbose, url, token, cli_config
    state.ca_file, state.client_cert, state.client_key = ca_file, client_cert, client_key
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO)
        logging.getLogger("alembic").setLevel(logging.INFO)  # migrations shown only with -v


main.add_command(serve.controller)
main.add_command(db.db)
main.add_command(tokens.tokens)
main.add_command(devices.devices)
devices.devices.add_command(security.devices_enroll)  # over the API, or local files
devices.devices.add_command(security.devices_revoke)  # over the API
main.add_command(keys.keys)
main.add_command(models.model)
models.model.add_command(quantize.model_quantize)  # local files only
models.model.add_command(model_init.model_init)  # local files only
models.model.add_command(publish.model_publish)  # package + sign + push, for CI
models.model.add_command(storage.model_migrate_storage)  # on the database and stores directly
main.add_command(security.certs)  # local files only
main.add_command(rollouts.rollout)  # staged rollouts over the API
