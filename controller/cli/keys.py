"""``edgefleet keys generate``: the Ed25519 keys that sign model bundles."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
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
