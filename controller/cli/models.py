"""``edgefleet model package|sign|verify|push|list|show``: model bundles (.efb).

``package``, ``sign`` and ``verify`` work on local files; ``push``, ``list`` and ``show``
use the HTTP API. ``model quantize`` is in :mod:`controller.cli.quantize`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from controller.cli.options import json_option, packaging_options
from controller.cli.output import ago, escape, lineage_lines, make_console, print_json
from controller.cli.settings import cli_state


@click.group()
def model() -> None:
    """Package, sign, verify and upload model bundles (.efb)."""


@model.command("package")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Model name (a-z, 0-9, '.', '_', '-').")
@click.option("--version", "version", required=True, help="Model version, e.g. 1.2.0.")
@packaging_options
@click.option(
    "--manifest-template",
    type=click.Path(exists=True, dir_okay=False),
    help="Manifest JSON to use when SRC is a model file.",
)
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
    from controller.keys import load_private_key
    from protocol.bundle import key_id

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
@json_option
@click.pass_context
def model_push(ctx: click.Context, bundle: str, as_json: bool) -> None:
    """Upload BUNDLE to the controller (needs an operator token)."""
    import httpx

    from controller.client import _detail, transport_error
    from controller.errors import ApiError, AuthError

    with cli_state(ctx).client() as client, Path(bundle).open("rb") as f:
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
        print_json(body)
        return
    signed = f"signed, key {body['key_id']}" if body["key_id"] else "signature not checked"
    click.echo(f"uploaded {body['ref']} ({body['size']} bytes, {signed})")
    click.echo(f"download: {client.url}{body['download_url']}")


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@model.command("list")
@click.argument("name", required=False)
@json_option
@click.pass_context
def model_list(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Uploaded models (optionally the versions of NAME), newest first."""
    with cli_state(ctx).client() as client:
        found = _api(client, "GET", "/api/v1/models", name=name)["models"]
    if as_json:
        print_json(found)
        return
    from rich.table import Table

    table = Table("MODEL", "RUNTIME", "SIZE", "SIGNED BY", "SHA256", "UPLOADED")
    now = time.time()
    for m in found:
        table.add_row(
            escape(m["ref"]),
            escape(m["runtime"]),
            str(m["size"]),
            escape(m["key_id"] or ("unchecked" if m["signature"] else "unsigned")),
            m["sha256"][:12],
            ago(m["created_at"], now),
        )
    console = make_console()
    console.print(table)
    console.print(f"{len(found)} model{'' if len(found) == 1 else 's'}")


@model.command("show")
@click.argument("ref", metavar="NAME[@VERSION]")
@json_option
@click.pass_context
def model_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """One model (the newest version without @VERSION): files, golden samples, download URL."""
    from controller.errors import NotFoundError

    name, version = _split_ref(ref)
    with cli_state(ctx).client() as client:
        if version is None:
            found = _api(client, "GET", "/api/v1/models", name=name)["models"]
            if not found:
                raise NotFoundError(f"no model named {name!r}; `edgefleet model list` shows them")
            m = found[0]
        else:
            m = _api(client, "GET", f"/api/v1/models/{name}/{version}")
        url = client.url
    if as_json:
        print_json(m)
        return
    console = make_console()
    man = m["manifest"]
    console.print(f"[bold]{escape(m['ref'])}[/]  runtime {escape(m['runtime'])}  {m['size']} bytes")
    console.print(f"sha256     {m['sha256']}")
    console.print(
        f"signature  {escape(m['key_id'] or ('unchecked' if m['signature'] else 'unsigned'))}"
    )
    console.print(f"download   {escape(url + m['download_url'])}")
    if man.get("latency_budget_ms") is not None:
        console.print(f"latency budget {man['latency_budget_ms']} ms")
    from rich.table import Table

    files = Table("FILE", "SIZE", "SHA256")
    for f in man.get("files", []):
        files.add_row(escape(f["path"]), str(f["size"]), f["sha256"][:12])
    console.print(files)
    for g in man.get("golden", []):
        found_s = ", ".join(f"{e[0]} {e[1]:.3f}" for e in g["expected"]) or "nothing"
        console.print(f"golden {escape(g['image'])}: {escape(found_s)}")
    for line in lineage_lines(m):
        console.print(escape(line))
