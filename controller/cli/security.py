"""CLI commands for TLS and broker security: ``edgefleet certs init|issue``, ``devices enroll``.

``certs`` is a group of its own; ``devices_enroll`` is a command the main CLI adds to its
``devices`` group. All of them work on local files only (no API, no database).
"""

from __future__ import annotations

from pathlib import Path

import click

from controller.enroll import DEFAULT_BROKER_URL, EnrollError


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
@click.option("--broker-url", default=DEFAULT_BROKER_URL, show_default=True)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False),
    help="CA certificate for the agent (and, with --cert-dir, the CA that signs; ca.key next to it).",
)
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False),
    help="Write a device certificate DEVICE_ID.pem/.key here (CN = device id).",
)
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False),
    help="Mosquitto password file to add/update the device's random password in.",
)
@click.option(
    "--state-dir", default="/var/lib/edgefleet", show_default=True, help="The agent's state_dir."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the agent config here (0600) instead of printing it.",
)
def devices_enroll(
    device_id: str,
    broker_url: str,
    ca_file: str | None,
    cert_dir: str | None,
    password_file: str | None,
    state_dir: str,
    out: str | None,
) -> None:
    """Create broker credentials for DEVICE_ID and a ready agent config.

    Reload Mosquitto (SIGHUP) after changing the password file.
    """
    from controller.enroll import enroll, write_config

    if out is not None and Path(out).exists():
        raise EnrollError(f"{out} already exists; refusing to overwrite it: pass another --out")
    result = enroll(
        device_id,
        broker_url=broker_url,
        ca_file=ca_file,
        cert_dir=cert_dir,
        password_file=password_file,
        state_dir=state_dir,
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
