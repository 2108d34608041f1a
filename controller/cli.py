"""``edgefleet``: the operator CLI and ``edgefleet controller serve``.

Most commands talk to the HTTP API (URL and token from --url/--token, EDGEFLEET_URL/
EDGEFLEET_TOKEN or the CLI config file ~/.config/edgefleet/cli.toml; for HTTPS the CA
from --ca-file/EDGEFLEET_CA_FILE/ca_file). ``tokens create``
and ``db upgrade`` work on the database directly, so the first admin token can be made
without one. Errors are one line (``error: ...``); ``-v`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec

from controller.cli_quantize import model_quantize
from controller.cli_rollout import rollout
from controller.cli_security import certs, devices_enroll
from controller.client import DEFAULT_URL, ControllerClient
from controller.errors import ConfigError, ControllerError

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
    verbose: int = 0
    url: str | None = None
    token: str | None = None
    cli_config: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def client(self) -> ControllerClient:
        settings = _cli_settings(self.cli_config)
        url = self.url or settings.url or DEFAULT_URL
        token = self.token or settings.token
        return ControllerClient(
            url=url,
            token=token,
            ca_file=self.ca_file or settings.ca_file,
            client_cert_file=self.client_cert or settings.client_cert_file,
            client_key_file=self.client_key or settings.client_key_file,
        )


def _default_cli_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgefleet" / "cli.toml"


def _cli_settings(explicit: str | None) -> CliSettings:
    path = Path(explicit) if explicit else _default_cli_config()
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


def _state(ctx: click.Context) -> CliState:
    return ctx.ensure_object(CliState)


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
    state = _state(ctx)
    state.verbose, state.url, state.token, state.cli_config = verbose, url, token, cli_config
    state.ca_file, state.client_cert, state.client_key = ca_file, client_cert, client_key
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO)


# --- output helpers ---------------------------------------------------------------------


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    delta = (now or time.time()) - ts
    if delta < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _e(value: object) -> str:
    """Escape text from the network/database for rich markup."""
    from rich.markup import escape

    return escape(str(value))


def _json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def _db_options(func: Any) -> Any:
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


def _load(config_path: str | None, data_dir: str | None, db_url: str | None, **more: Any) -> Any:
    from controller.config import load_config

    overrides: dict[str, Any] = {
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "database.url": db_url,
    }
    overrides.update(more)
    return load_config(config_path, overrides=overrides)


def _open_db(config_path: str | None, data_dir: str | None, db_url: str | None) -> Any:
    from controller.db.session import Database

    loaded = _load(config_path, data_dir, db_url)
    db = Database.from_url(loaded.database_url)
    db.upgrade()
    return db


# --- controller serve -------------------------------------------------------------------


@main.group()
def controller() -> None:
    """Run the controller."""


@controller.command("serve")
@_db_options
@click.option("--broker-url", help="Use this MQTT broker instead of the embedded one.")
@click.option("--bind", help="API listen address [default: 127.0.0.1].")
@click.option("--port", type=int, help="API port [default: 8080; 0 = any free port].")
@click.option("--mqtt-port", type=int, help="Embedded broker port [default: 1883; 0 = any free].")
@click.option(
    "--dev-token",
    is_flag=True,
    help="Create a fresh admin token named 'dev', print it and write it to DATA_DIR/dev-token.",
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
    log_level: str | None,
) -> None:
    """Run the controller: migrations, MQTT ingestion, HTTP API (until Ctrl-C/SIGTERM).

    With no config it needs nothing: SQLite under ./edgefleet-data (or --data-dir) and an
    embedded MQTT broker on 127.0.0.1:1883 whose credentials it prints.
    """
    from controller.service import Controller

    loaded = _load(
        config_path,
        data_dir,
        db_url,
        **{
            "broker.url": broker_url,
            "api.bind": bind,
            "api.port": port,
            "embedded_broker.port": mqtt_port,
            "log_level": log_level,
        },
    )
    verbose = _state(ctx).verbose
    level = "debug" if verbose > 1 else loaded.config.log_level
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    ctl = Controller(loaded)
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


# --- db ---------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database maintenance (works on the database directly)."""


@db.command("upgrade")
@_db_options
def db_upgrade(config_path: str | None, data_dir: str | None, db_url: str | None) -> None:
    """Apply the schema migrations (the controller also does this on start)."""
    from controller.db.session import Database, current_revision

    loaded = _load(config_path, data_dir, db_url)
    database = Database.from_url(loaded.database_url)
    try:
        database.upgrade()
        click.echo(f"database {database.url} is at revision {current_revision(database.engine)}")
    finally:
        database.dispose()


# --- tokens -----------------------------------------------------------------------------


@main.group()
def tokens() -> None:
    """API tokens: create (on the database), list and revoke (API, or --db/--config)."""


@tokens.command("create")
@_db_options
@click.option(
    "--role", type=click.Choice(["viewer", "operator", "admin"]), required=True, help="Token role."
)
@click.option("--name", default=None, help="A name to recognise the token [default: ROLE].")
@_json_option
def tokens_create(
    config_path: str | None,
    data_dir: str | None,
    db_url: str | None,
    role: str,
    name: str | None,
    as_json: bool,
) -> None:
    """Create a token on the controller's database and print it (shown only once)."""
    from controller import store

    database = _open_db(config_path, data_dir, db_url)
    try:
        with database.begin() as conn:
            info, token = store.create_token(
                conn,
                name=name or role,
                role=role,  # type: ignore[arg-type]
                now=time.time(),
            )
    finally:
        database.dispose()
    if as_json:
        _print_json({"id": info.id, "name": info.name, "role": info.role, "token": token})
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
@_db_options
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@_json_option
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

        from controller import store

        database = _open_db(config_path, data_dir, db_url)
        try:
            with database.connect() as conn:
                rows = [asdict(t) for t in store.list_tokens(conn, include_revoked=include_revoked)]
        finally:
            database.dispose()
    else:
        with _state(ctx).client() as client:
            rows = client.tokens(include_revoked=include_revoked)
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table("ID", "NAME", "ROLE", "PREFIX", "CREATED", "LAST USED", "REVOKED")
    for t in rows:
        table.add_row(
            str(t["id"]),
            _e(t["name"]),
            t["role"],
            t["prefix"] + "…",
            _ago(t["created_at"]),
            _ago(t["last_used_at"]),
            _ago(t["revoked_at"]) if t["revoked_at"] else "",
        )
    _console().print(table)


@tokens.command("revoke")
@_db_options
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
        from controller import store

        database = _open_db(config_path, data_dir, db_url)
        try:
            with database.begin() as conn:
                done = store.revoke_token(conn, token_id, now=time.time())
        finally:
            database.dispose()
        if not done:
            raise ControllerError(
                f"no active token with id {token_id}; `edgefleet tokens list` shows them"
            )
    else:
        with _state(ctx).client() as client:
            client.revoke_token(token_id)
    click.echo(f"revoked token {token_id}")


# --- devices ----------------------------------------------------------------------------


@main.group()
def devices() -> None:
    """Devices known to the controller (via the HTTP API)."""


def _models(device: dict[str, Any]) -> str:
    models = sorted({s["active_model"] for s in device["streams"] if s["active_model"]})
    return ", ".join(models) or "-"


@devices.command("list")
@click.option("--tag", "tags", multiple=True, help="Only devices with this tag (repeatable).")
@click.option("--online/--offline", default=None, help="Only online / offline devices.")
@click.option("--model", help="Only devices running this name@version.")
@_json_option
@click.pass_context
def devices_list(
    ctx: click.Context, tags: tuple[str, ...], online: bool | None, model: str | None, as_json: bool
) -> None:
    """List devices: state, agent version, active models, tags, last seen."""
    with _state(ctx).client() as client:
        found = client.devices(tags=list(tags), online=online, model=model)
    if as_json:
        _print_json(found)
        return
    from rich.table import Table

    now = time.time()
    table = Table("DEVICE", "STATE", "AGENT", "MODELS", "TAGS", "LAST SEEN")
    for d in found:
        state = "[green]online[/]" if d["online"] else f"[red]{_e(d['state'] or 'offline')}[/]"
        table.add_row(
            _e(d["id"]),
            state,
            _e(d["agent_version"] or "-"),
            _e(_models(d)),
            _e(", ".join(d["tags"]) or "-"),
            _ago(d["last_seen"], now),
        )
    console = _console()
    console.print(table)
    online_n = sum(1 for d in found if d["online"])
    console.print(f"{len(found)} devices, {online_n} online")


@devices.command("show")
@click.argument("device_id")
@_json_option
@click.pass_context
def devices_show(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """One device: status, streams and models, latest telemetry, recent events."""
    with _state(ctx).client() as client:
        device = client.device(device_id)
        latest = client.telemetry(device_id, limit=1)
        recent = client.events(device_id=device_id, limit=5)
    if as_json:
        _print_json({"device": device, "telemetry": latest, "events": recent})
        return
    from rich.table import Table

    now = time.time()
    console = _console()
    state = (
        "[green]online[/]" if device["online"] else f"[red]{_e(device['state'] or 'offline')}[/]"
    )
    console.print(
        f"[bold]{_e(device['id'])}[/]  {state}  agent {_e(device['agent_version'] or '-')}"
    )
    uptime = (
        f"{(device['status_ts'] or now) - device['started_at']:.0f}s"
        if device["started_at"]
        else "-"
    )
    console.print(
        f"first seen {_ago(device['first_seen'], now)}, last seen {_ago(device['last_seen'], now)}, "
        f"uptime {uptime}, tags: {_e(', '.join(device['tags']) or '-')}, "
        f"desired rev {device['desired_rev'] if device['desired_rev'] is not None else '-'}"
    )
    if device["streams"]:
        table = Table("STREAM", "SOURCE", "ACTIVE MODEL", "PREVIOUS", "PHASE", "ERROR")
        for s in device["streams"]:
            table.add_row(
                *(
                    _e(v)
                    for v in (
                        s["name"],
                        s["source_state"] or "-",
                        s["active_model"] or "-",
                        s["previous_model"] or "-",
                        s["phase"] or "-",
                        s["error"] or s["reason"] or "",
                    )
                )
            )
        console.print(table)
    if latest:
        t = latest[-1]
        temp = f"{t['temp_c']:.1f}°C" if t["temp_c"] is not None else "-"
        console.print(
            f"telemetry {_ago(t['ts'], now)}: cpu {t['cpu_percent']:.0f}%, "
            f"mem {t['mem_percent']:.0f}%, temp {temp}, disk {t['disk_percent']:.0f}%, "
            f"spool {t['spool_depth']}"
        )
        for s in t["streams"]:
            console.print(
                f"  {_e(s.get('name'))}: {s.get('fps') or 0:.1f} fps, "
                f"latency p95 {s.get('latency_ms_p95') or '-'} ms, dropped {s.get('frames_dropped', '-')}"
            )
    for e in recent:
        console.print(
            f"event {_ago(e['ts'], now)} {_e('[' + e['level'] + ']')} {_e(e['code'])}: "
            f"{_e(e['message'])}"
        )


@devices.command("tag")
@click.argument("device_id")
@click.argument("add", nargs=-1)
@click.option("-r", "--remove", multiple=True, help="Remove this tag (repeatable).")
@_json_option
@click.pass_context
def devices_tag(
    ctx: click.Context,
    device_id: str,
    add: tuple[str, ...],
    remove: tuple[str, ...],
    as_json: bool,
) -> None:
    """Add tags (arguments) and remove tags (-r) of a device; prints its tags."""
    with _state(ctx).client() as client:
        if add or remove:
            result = client.change_tags(device_id, add=list(add), remove=list(remove))
        else:
            result = client.device(device_id)["tags"]
    if as_json:
        _print_json({"device_id": device_id, "tags": result})
        return
    click.echo(f"{device_id}: {', '.join(result) or '(no tags)'}")


# --- signing keys and model bundles -----------------------------------------------------


@main.group()
def keys() -> None:
    """Ed25519 keys that sign model bundles."""


@keys.command("generate")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the keys."
)
def keys_generate(out_dir: str) -> None:
    """Write signing.key (private, mode 0600) and signing.pub; refuses to overwrite."""
    from controller.keys import generate_keys

    key_path, pub_path, kid = generate_keys(Path(out_dir))
    click.echo(f"private key: {key_path} (keep it secret, off the controller)")
    click.echo(f"public key:  {pub_path} (give it to devices: [ota] trusted_keys)")
    click.echo(f"key id:      {kid}")


@main.group()
def model() -> None:
    """Package, sign, verify and upload model bundles (.efb)."""


@model.command("package")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Model name (a-z, 0-9, '.', '_', '-').")
@click.option("--version", "version", required=True, help="Model version, e.g. 1.2.0.")
@click.option("--runtime", type=click.Choice(["litert", "onnx"]), help="Override the runtime.")
@click.option(
    "--manifest-template",
    type=click.Path(exists=True, dir_okay=False),
    help="Manifest JSON to use when SRC is a model file.",
)
@click.option(
    "--golden",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="PNG image whose detections become a golden sample (repeatable).",
)
@click.option("--latency-budget-ms", type=float, help="Per-inference latency budget.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Bundle to write.")
def model_package(
    src: str,
    name: str,
    version: str,
    runtime: str | None,
    manifest_template: str | None,
    golden: tuple[str, ...],
    latency_budget_ms: float | None,
    out: str,
) -> None:
    """Build an unsigned bundle from SRC (a manifest .json, or a model file + template).

    Golden outputs are computed by running the model here through the agent's offline mode.
    """
    from controller.bundles import package_model

    info = package_model(
        Path(src),
        out=Path(out),
        name=name,
        version=version,
        runtime=runtime,
        golden=[Path(g) for g in golden],
        manifest_template=Path(manifest_template) if manifest_template else None,
        latency_budget_ms=latency_budget_ms,
    )
    m = info.manifest
    click.echo(f"wrote {out}: {m.ref}, {info.size} bytes, sha256 {info.sha256}")
    for g in m.golden:
        found = ", ".join(f"{label} {score:.3f}" for label, score, _ in g.expected) or "nothing"
        click.echo(f"  golden {g.image}: {found}")
    click.echo(f"next: edgefleet model sign {out} --key signing.key")


@model.command("sign")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False))
def model_sign(bundle: str, key_path: str) -> None:
    """Add manifest.sig to BUNDLE (rewritten atomically)."""
    from controller.bundles import sign_bundle
    from controller.keys import key_id, load_private_key

    key = load_private_key(Path(key_path))
    info = sign_bundle(Path(bundle), key)
    kid = key_id(key.public_key())
    click.echo(f"signed {bundle} ({info.manifest.ref}) with key {kid}; sha256 {info.sha256}")


@model.command("verify")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--pub",
    "pubs",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Trusted public key (repeatable); without it only structure and hashes are checked.",
)
def model_verify(bundle: str, pubs: tuple[str, ...]) -> None:
    """Check BUNDLE as a device would: members, hashes and the signature."""
    from controller.bundles import read_bundle, verify_signature
    from controller.keys import load_public_key

    info = read_bundle(Path(bundle))
    click.echo(f"structure and hashes ok: {info.manifest.ref}, {len(info.manifest.files)} files")
    if pubs:
        kid = verify_signature(info, [load_public_key(Path(p)) for p in pubs])
        click.echo(f"signature ok (key {kid})")
    else:
        click.echo("signature not checked (pass --pub signing.pub)")


def _api(client: Any, method: str, path: str, **params: Any) -> Any:
    return client._request(method, path, params=params)


@model.command("push")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@_json_option
@click.pass_context
def model_push(ctx: click.Context, bundle: str, as_json: bool) -> None:
    """Upload BUNDLE to the controller (needs an operator token)."""
    import httpx

    from controller.client import _detail, transport_error
    from controller.errors import ApiError, AuthError

    with _state(ctx).client() as client, Path(bundle).open("rb") as f:
        http: httpx.Client = client._http
        try:
            resp = http.post(
                "/api/v1/models",
                content=iter(lambda: f.read(1 << 20), b""),
                headers={"Content-Type": "application/octet-stream"},
                timeout=httpx.Timeout(10.0, read=300.0, write=300.0),
            )
        except httpx.HTTPError as err:
            raise transport_error(
                client.url, err, doing="upload", client_cert=client.client_cert
            ) from err
    if resp.status_code in (401, 403):
        raise AuthError(f"{resp.status_code}: {_detail(resp)}", status=resp.status_code)
    if not resp.is_success:
        raise ApiError(
            f"upload refused ({resp.status_code}): {_detail(resp)}", status=resp.status_code
        )
    body = resp.json()
    if as_json:
        _print_json(body)
        return
    signed = f"signed, key {body['key_id']}" if body["key_id"] else "signature not checked"
    click.echo(f"uploaded {body['ref']} ({body['size']} bytes, {signed})")
    click.echo(f"download: {client.url}{body['download_url']}")


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@model.command("list")
@click.argument("name", required=False)
@_json_option
@click.pass_context
def model_list(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Uploaded models (optionally the versions of NAME), newest first."""
    with _state(ctx).client() as client:
        found = _api(client, "GET", "/api/v1/models", name=name)["models"]
    if as_json:
        _print_json(found)
        return
    from rich.table import Table

    table = Table("MODEL", "RUNTIME", "SIZE", "SIGNED BY", "SHA256", "UPLOADED")
    now = time.time()
    for m in found:
        table.add_row(
            _e(m["ref"]),
            _e(m["runtime"]),
            str(m["size"]),
            _e(m["key_id"] or ("unchecked" if m["signature"] else "unsigned")),
            m["sha256"][:12],
            _ago(m["created_at"], now),
        )
    console = _console()
    console.print(table)
    console.print(f"{len(found)} models")


@model.command("show")
@click.argument("ref", metavar="NAME[@VERSION]")
@_json_option
@click.pass_context
def model_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """One model (the newest version without @VERSION): files, golden samples, download URL."""
    from controller.errors import NotFoundError

    name, version = _split_ref(ref)
    with _state(ctx).client() as client:
        if version is None:
            found = _api(client, "GET", "/api/v1/models", name=name)["models"]
            if not found:
                raise NotFoundError(f"no model named {name!r}; `edgefleet model list` shows them")
            m = found[0]
        else:
            m = _api(client, "GET", f"/api/v1/models/{name}/{version}")
        url = client.url
    if as_json:
        _print_json(m)
        return
    console = _console()
    man = m["manifest"]
    console.print(f"[bold]{_e(m['ref'])}[/]  runtime {_e(m['runtime'])}  {m['size']} bytes")
    console.print(f"sha256     {m['sha256']}")
    console.print(
        f"signature  {_e(m['key_id'] or ('unchecked' if m['signature'] else 'unsigned'))}"
    )
    console.print(f"download   {_e(url + m['download_url'])}")
    if man.get("latency_budget_ms") is not None:
        console.print(f"latency budget {man['latency_budget_ms']} ms")
    from rich.table import Table

    files = Table("FILE", "SIZE", "SHA256")
    for f in man.get("files", []):
        files.add_row(_e(f["path"]), str(f["size"]), f["sha256"][:12])
    console.print(files)
    for g in man.get("golden", []):
        found_s = ", ".join(f"{e[0]} {e[1]:.3f}" for e in g["expected"]) or "nothing"
        console.print(f"golden {_e(g['image'])}: {_e(found_s)}")


# --- TLS certificates and device enrollment (local files only, controller.cli_security) ---

main.add_command(certs)
devices.add_command(devices_enroll)

model.add_command(model_quantize)  # local files only (controller.cli_quantize)

# --- staged rollouts (over the API, controller.cli_rollout) --------------------------------

main.add_command(rollout)


if __name__ == "__main__":  # pragma: no cover
    main()
