"""CLI commands for TLS and broker security: ``edgefleet certs init|issue``, ``devices
enroll|revoke``.

``certs`` is a group of its own and works on local files only. ``devices_enroll`` and
``devices_revoke`` are commands the main CLI adds to its ``devices`` group: without
``--password-file``/``--cert-dir`` they enrol the device on the running controller's
embedded broker over the API; with them, they work on local files (an external Mosquitto).
"""

from __future__ import annotations

from pathlib import Path

import click

from controller.cli.settings import cli_state
from controller.enroll import DEFAULT_BROKER_URL, DEFAULT_SOURCE, EnrollError


@click.group()
def certs() -> None:
    """A small CA for TLS (broker, controller API): CA, server and device certificates."""


@certs.command("init")
@click.option(
    "--dir", "directory", required=True, type=click.Path(file_okay=False), help="CA folder."
)
@click.option("--cn", "common_name", default="edgefleet CA", show_default=True)
@click.option("--days", default=3650, show_default=True, type=int)
def certs_init(directory: str, common_name: str, days: int) -> None:
    """Create ca.pem and ca.key (0600) in DIR; never overwrites."""
    from controller.certs import init_ca

    pair = init_ca(directory, common_name=common_name, days=days)
    click.echo(f"CA certificate {pair.cert}\nCA key         {pair.key} (keep it secret)")


@certs.command("issue")
@click.argument("name")
@click.option(
    "--ca-dir", required=True, type=click.Path(file_okay=False), help="Folder of ca.pem/ca.key."
)
@click.option(
    "--kind",
    type=click.Choice(["server", "device"]),
    required=True,
    help="server: serverAuth + SANs; device: clientAuth, CN = NAME = device id.",
)
@click.option("--dns", multiple=True, help="DNS SAN (repeatable; server default: localhost).")
@click.option("--ip", multiple=True, help="IP SAN (repeatable; server default: 127.0.0.1).")
@click.option("--days", default=825, show_default=True, type=int)
@click.option(
    "--out-dir", type=click.Path(file_okay=False), help="Where to write (default: --ca-dir)."
)
def certs_issue(
    name: str,
    ca_dir: str,
    kind: str,
    dns: tuple[str, ...],
    ip: tuple[str, ...],
    days: int,
    out_dir: str | None,
) -> None:
    """Sign NAME.pem / NAME.key with the CA; never overwrites."""
    from controller.certs import issue

    pair = issue(
        ca_dir,
        name=name,
        kind="server" if kind == "server" else "device",
        dns=list(dns) if dns or ip else None,
        ips=list(ip) if dns or ip else None,
        days=days,
        out_dir=out_dir,
    )
    click.echo(f"certificate {pair.cert}\nkey         {pair.key}")


@click.command("enroll")
@click.argument("device_id")
@click.option(
    "--broker-url",
    help="Broker URL for the agent [default: the controller's embedded broker; with "
    f"--password-file/--cert-dir: {DEFAULT_BROKER_URL}].",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False),
    help="CA certificate for the agent (and, with --cert-dir, the CA that signs; ca.key next to it).",
)
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False),
    help="Local mode: write a device certificate DEVICE_ID.pem/.key here (CN = device id).",
)
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False),
    help="Local mode: the Mosquitto password file (external broker) to add the device to.",
)
@click.option(
    "--state-dir", default="/var/lib/edgefleet", show_default=True, help="The agent's state_dir."
)
@click.option("--source", default=DEFAULT_SOURCE, show_default=True, help="The stream's source.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the agent config here (0600) instead of printing it.",
)
@click.pass_context
def devices_enroll(
    ctx: click.Context,
    device_id: str,
    broker_url: str | None,
    ca_file: str | None,
    cert_dir: str | None,
    password_file: str | None,
    state_dir: str,
    source: str,
    out: str | None,
) -> None:
    """Create broker credentials for DEVICE_ID and print a ready agent config.

    By default the running controller (--url/--token, admin role) adds the device to its
    embedded broker: a new random password (an earlier one stops working), kept across
    restarts. With --password-file/--cert-dir it works on local files for an external
    Mosquitto instead: reload Mosquitto (SIGHUP) after changing the password file.
    """
    from controller.enroll import enroll, write_config

    if out is not None and Path(out).exists():
        raise EnrollError(f"{out} already exists; refusing to overwrite it: pass another --out")
    if password_file is None and cert_dir is None:
        _enroll_over_api(ctx, device_id, broker_url, ca_file, state_dir, source, out)
        return
    result = enroll(
        device_id,
        broker_url=broker_url or DEFAULT_BROKER_URL,
        ca_file=ca_file,
        cert_dir=cert_dir,
        password_file=password_file,
        state_dir=state_dir,
        source=source,
    )
    if out is None:
        click.echo(result.config, nl=False)
        return
    write_config(out, result.config)
    done = [f"agent config {out}"]
    if result.cert is not None:
        done.append(f"certificate  {result.cert.cert} / {result.cert.key}")
    if password_file is not None:
        done.append(
            f"password     added for user {device_id!r} to {password_file} (SIGHUP mosquitto)"
        )
    click.echo("\n".join(done), err=True)


def _enroll_over_api(
    ctx: click.Context,
    device_id: str,
    broker_url: str | None,
    ca_file: str | None,
    state_dir: str,
    source: str,
    out: str | None,
) -> None:
    from controller.enroll import agent_config, write_config
    from protocol.errors import ProtocolError
    from protocol.topics import validate_device_id

    try:
        validate_device_id(device_id)
    except ProtocolError as err:
        raise EnrollError(str(err)) from err
    with cli_state(ctx).client() as client:
        creds = client.create_credentials(device_id)
    keys = [k["path"] for k in creds["trusted_keys"]]
    if not keys:
        click.echo(
            "warning: the controller trusts no signing key, so this device will refuse every "
            "model update (no_trusted_keys): serve with --trusted-key PUBLIC_KEY "
            "(models.trusted_keys) and enrol it again, or set [ota] trusted_keys on the device",
            err=True,
        )
    if out is not None:  # the keys go next to the config; it names them relatively
        keys = []
        for i, key in enumerate(creds["trusted_keys"]):
            path = Path(out).with_name(f"{Path(out).stem}-trusted-{i}.pub")
            path.write_text(key["pem"], encoding="utf-8")
            keys.append(path.name)
    config = agent_config(
        device_id,
        broker_url=broker_url or creds["broker_url"],
        username=creds["username"],
        password=creds["password"],
        ca_file=str(Path(ca_file).resolve()) if ca_file else None,
        state_dir=state_dir,
        source=source,
        trusted_keys=keys,
    )
    if out is None:
        click.echo(config, nl=False)
        return
    write_config(out, config)
    click.echo(
        f"agent config {out} (broker {broker_url or creds['broker_url']}, user {device_id!r})",
        err=True,
    )


@click.command("revoke")
@click.argument("device_id")
@click.pass_context
def devices_revoke(ctx: click.Context, device_id: str) -> None:
    """Take DEVICE_ID's login on the embedded broker away (admin role); the broker reloads
    and refuses the device from then on. (External broker: remove its line from the
    password file and SIGHUP mosquitto.)"""
    with cli_state(ctx).client() as client:
        client.revoke_credentials(device_id)
    click.echo(f"revoked the broker login of {device_id!r}")
