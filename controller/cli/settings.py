"""Where the operator CLI finds the controller: the CLI config file (TOML), the global
options of ``edgefleet`` (:class:`CliState`) and the API client they make."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import msgspec

from controller.client import DEFAULT_URL, ControllerClient
from controller.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CLI_CONFIG_ENV = "EDGEFLEET_CLI_CONFIG"


class CliSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The CLI config file (TOML): where the API is, which token to use, which CA to trust.

    Relative file paths are resolved against the config file's folder.
    """

    url: str | None = None
    token: str | None = None
    ca_file: str | None = None
    """CA certificate (PEM) that signed the controller's HTTPS certificate."""
    client_cert_file: str | None = None
    """Client certificate (PEM) for a controller that requires one (api.tls_client_ca_file)."""
    client_key_file: str | None = None


CLI_KEYS = ", ".join(repr(k) for k in CliSettings.__struct_fields__)


@dataclass
class CliState:
    """The root command's options, shared with every command through the click context."""

    verbose: int = 0
    url: str | None = None
    token: str | None = None
    cli_config: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def client(self) -> ControllerClient:
        settings = cli_settings(self.cli_config)
        url = self.url or settings.url or DEFAULT_URL
        token = self.token or settings.token
        return ControllerClient(
            url=url,
            token=token,
            ca_file=self.ca_file or settings.ca_file,
            client_cert_file=self.client_cert or settings.client_cert_file,
            client_key_file=self.client_key or settings.client_key_file,
        )


def cli_state(ctx: click.Context) -> CliState:
    """The :class:`CliState` of this invocation (made on first use)."""
    return ctx.ensure_object(CliState)


def default_cli_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgefleet" / "cli.toml"


def cli_settings(explicit: str | None) -> CliSettings:
    """The CLI config file ``explicit`` (must exist) or the default one (may be missing)."""
    path = Path(explicit) if explicit else default_cli_config()
    if not path.is_file():
        if explicit:
            raise ConfigError(f"CLI config file {path} not found")
        return CliSettings()
    try:
        settings = msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), CliSettings)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as err:
        raise ConfigError(f"{path}: {err}; the CLI config knows only the keys {CLI_KEYS}") from err
    base = path.resolve().parent

    def resolve(value: str | None) -> str | None:
        return None if value is None else str(base / Path(value).expanduser())

    return msgspec.structs.replace(
        settings,
        ca_file=resolve(settings.ca_file),
        client_cert_file=resolve(settings.client_cert_file),
        client_key_file=resolve(settings.client_key_file),
    )
