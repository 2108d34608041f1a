"""``edgefleet model publish``: package, sign and upload a model in one non-interactive step,
for CI pipelines (examples/ci/). Lineage (source commit, training data, metrics, labels)
goes into the signed manifest.

It reuses ``model package`` (:func:`controller.bundles.package_model`) and ``model push``
(:func:`controller.cli.models.model_push`); only the exit codes are its own.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from controller.cli.options import json_option, packaging_options
from controller.errors import ApiError, AuthError, ConnectionFailedError, ControllerError

EXIT_PUBLISHED = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2  # click's own code for a command line it cannot parse
EXIT_REFUSED = 3
EXIT_EXISTS = 4
EXIT_UNREACHABLE = 5
EXIT_AUTH = 6

KEY_ENV = "EDGEFLEET_SIGNING_KEY"
KEY_FILE_ENV = "EDGEFLEET_SIGNING_KEY_FILE"

EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_PUBLISHED}  published (or, with --if-exists skip, the identical model is there already)
  {EXIT_CONFIG}  local problem: model/manifest, lineage, signing key or CLI config
  {EXIT_USAGE}  command-line usage error (unknown option, missing value)
  {EXIT_REFUSED}  the controller refused the bundle (422/413/400: invalid, untrusted signature)
  {EXIT_EXISTS}  NAME@VERSION exists already (with --if-exists skip: with other content)
  {EXIT_UNREACHABLE}  the controller cannot be reached or failed (connection, TLS, 5xx): retry
  {EXIT_AUTH}  the token was refused (401 missing/unknown/revoked, 403 not operator)
"""


class PublishError(ControllerError):
    """A publish step failed; ``code`` is the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise PublishError(f"{option} {v!r}: use {option} NAME=VALUE", EXIT_CONFIG)
        out.append((key, value))
    return out


def parse_metrics(values: tuple[str, ...]) -> dict[str, float]:
    """``--metric NAME=VALUE`` (repeatable) to a dict of finite numbers."""
    metrics: dict[str, float] = {}
    for key, value in _pairs(values, "--metric"):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise PublishError(
                f"--metric {key}={value!r}: the value must be a finite number, e.g. "
                f"--metric {key}=0.71",
                EXIT_CONFIG,
            )
        metrics[key] = number
    return metrics


def load_signing_key(key_path: str | None) -> Any:
    """The ed25519 private key of --key / $EDGEFLEET_SIGNING_KEY_FILE, else the PEM text in
    $EDGEFLEET_SIGNING_KEY; PublishError when there is none or it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from controller.keys import load_private_key

    if key_path:
        return load_private_key(Path(key_path))
    pem = os.environ.get(KEY_ENV, "")
    if not pem.strip():
        raise PublishError(
            f"no signing key: pass --key FILE, or set {KEY_FILE_ENV} to a key file or {KEY_ENV} "
            "to the PEM text (`edgefleet keys generate` makes one)",
            EXIT_CONFIG,
        )
    if "\n" not in pem.strip() and "\\n" in pem:  # a secret store that escaped the newlines
        pem = pem.replace("\\n", "\n")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as err:
        raise PublishError(
            f"{KEY_ENV} is not an unencrypted PKCS#8 PEM private key ({err}); put the whole "
            "signing.key file in it, BEGIN and END lines included",
            EXIT_CONFIG,
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise PublishError(f"{KEY_ENV} is not an ed25519 key", EXIT_CONFIG)
    return key


def _template(src: Path, manifest_template: str | None) -> tuple[Path, Path | None]:
    """(manifest JSON, model file or None): a model file's manifest is --manifest-template
    or the .json of the same name next to it."""
    if src.suffix == ".json":
        return src, None
    if manifest_template:
        return Path(manifest_template), src
    sibling = src.with_suffix(".json")
    if sibling.is_file():
        return sibling, src
    raise PublishError(
        f"{src} is a model file and {sibling.name} is not next to it: pass "
        "--manifest-template JSON (input, decoder, labels) or give the manifest .json",
        EXIT_CONFIG,
    )


def _name_version(template: Path, name: str | None, version: str | None) -> tuple[str, str]:
    import json

    try:
        raw = json.loads(template.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot read manifest {template}: {err}", EXIT_CONFIG) from err
    raw = raw if isinstance(raw, dict) else {}
    name = name or raw.get("name")
    version = version or raw.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        raise PublishError(
            f"{template} has no name/version: pass --name and --version", EXIT_CONFIG
        )
    return name, version


def with_lineage(manifest: Any, overrides: dict[str, Any]) -> Any:
    """``manifest`` with its lineage updated by ``overrides`` (strings replace, metrics and
    labels merge); checked like any manifest."""
    import msgspec

    from protocol import ProtocolError, decode_manifest, encode_manifest
    from protocol.manifest import Lineage

    current = manifest.lineage if isinstance(manifest.lineage, Lineage) else Lineage()
    merged = msgspec.to_builtins(current)
    for field in ("source_commit", "training_data"):
        if overrides.get(field) is not None:
            merged[field] = overrides[field]
    for field in ("metrics", "labels"):
        merged[field] = {**merged.get(field, {}), **overrides.get(field, {})}
    if not any(merged.get(f) for f in ("source_commit", "training_data", "metrics", "labels")):
        return manifest
    raw = {**msgspec.to_builtins(manifest), "lineage": merged}
    try:
        return decode_manifest(encode_manifest(msgspec.convert(raw, type(manifest))))
    except (ProtocolError, msgspec.ValidationError) as err:
        raise PublishError(
            f"lineage: {err} (source commit max 128 characters, training data max 512, "
            "at most 32 metrics and 32 labels with names of A-Z a-z 0-9 . _ / -)",
            EXIT_CONFIG,
        ) from err


def build_signed_bundle(
    src: Path, out: Path, key: Any, lineage: dict[str, Any], **package: Any
) -> Any:
    """Package ``src`` (as ``model package``), add ``lineage`` and sign: the BundleInfo."""
    import tarfile

    from controller.bundles import package_model, read_bundle, write_bundle
    from protocol.bundle import MANIFEST_NAME, sign_manifest

    with tempfile.TemporaryDirectory(prefix="efb-publish-") as tmp:
        unsigned = Path(tmp) / "unsigned.efb"
        info = package_model(src, out=unsigned, **package)
        manifest = with_lineage(info.manifest, lineage)
        files = Path(tmp) / "files"
        with tarfile.open(unsigned) as tar:  # read_bundle checked: safe names, regular files
            for member in tar:
                data = tar.extractfile(member)
                if data is None or member.name == MANIFEST_NAME:
                    continue
                dest = files / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with dest.open("wb") as f:
                    shutil.copyfileobj(data, f)
        write_bundle(
            out,
            manifest,
            {f.path: files / f.path for f in manifest.files},
            signature=sign_manifest(manifest, key),
        )
    return read_bundle(out)


def _push_code(err: ControllerError) -> int:
    if isinstance(err, AuthError):
        return EXIT_AUTH
    if isinstance(err, ConnectionFailedError):
        return EXIT_UNREACHABLE
    if isinstance(err, ApiError):
        if err.status == 409:
            return EXIT_EXISTS
        if err.status is None or err.status >= 500:
            return EXIT_UNREACHABLE
        return EXIT_REFUSED
    return EXIT_CONFIG


def _same_as_stored(ctx: click.Context, info: Any, as_json: bool) -> bool:
    """Whether the stored NAME@VERSION has this manifest and signature (printed if so)."""
    import msgspec

    from controller.cli.models import _api
    from controller.cli.output import print_json
    from controller.cli.settings import cli_state

    m = info.manifest
    with cli_state(ctx).client() as client:
        stored = _api(client, "GET", f"/api/v1/models/{m.name}/{m.version}")
    if stored["manifest"] != msgspec.to_builtins(m) or stored["signature"] != info.signature:
        return False
    if as_json:
        print_json(stored)
    else:
        click.echo(f"{m.ref} is already published with this content (sha256 {stored['sha256']})")
    return True


def _publish(ctx: click.Context, src: Path, opts: dict[str, Any]) -> None:
    from controller.cli.models import model_push

    if not src.is_file():
        raise PublishError(
            f"{src} not found: give a model manifest .json or model file", EXIT_CONFIG
        )
    template, _ = _template(src, opts["manifest_template"])
    name, version = _name_version(template, opts["name"], opts["version"])
    key = load_signing_key(opts["key_path"])
    lineage = {
        "source_commit": opts["source_commit"],
        "training_data": opts["training_data"],
        "metrics": parse_metrics(opts["metric"]),
        "labels": dict(_pairs(opts["label"], "--label")),
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as tmp:
        out = Path(opts["out"]) if opts["out"] else Path(tmp) / f"{name}-{version}.efb"
        info = build_signed_bundle(
            src,
            out,
            key,
            lineage,
            name=name,
            version=version,
            runtime=opts["runtime"],
            golden=[Path(g) for g in opts["golden"]],
            manifest_template=template if src.suffix != ".json" else None,
            latency_budget_ms=opts["latency_budget_ms"],
        )
        click.echo(f"packaged and signed {info.manifest.ref} ({info.size} bytes)", err=True)
        try:
            ctx.invoke(model_push, bundle=str(out), as_json=opts["as_json"])
        except ControllerError as err:
            code = _push_code(err)
            if code == EXIT_EXISTS and opts["if_exists"] == "skip":
                if _same_as_stored(ctx, info, opts["as_json"]):
                    return
                raise PublishError(
                    f"{info.manifest.ref} exists already with other content (manifest, lineage "
                    "or signature differ); versions are immutable: publish a new --version",
                    EXIT_EXISTS,
                ) from err
            raise PublishError(str(err), code) from err


@click.command("publish", epilog=EXIT_CODES_HELP)
@click.argument("src", metavar="MODEL_OR_MANIFEST", type=click.Path(dir_okay=False))
@click.option("--name", help="Model name [default: the manifest's].")
@click.option("--version", "version", help="Model version, e.g. 1.2.0 [default: the manifest's].")
@click.option(
    "--key",
    "key_path",
    envvar=KEY_FILE_ENV,
    type=click.Path(dir_okay=False),
    help=f"Signing key (PEM) [env {KEY_FILE_ENV}; or the PEM text itself in {KEY_ENV}].",
)
@click.option("--source-commit", help="Lineage: the commit the model was built from.")
@click.option("--training-data", help="Lineage: the training data set (URI, name or version).")
@click.option("--metric", multiple=True, metavar="NAME=VALUE", help="Lineage metric (repeatable).")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="Lineage label (repeatable).")
@click.option(
    "--if-exists",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="When NAME@VERSION exists: fail (exit 4), or skip (exit 0) if it is identical.",
)
@packaging_options
@click.option(
    "--manifest-template",
    type=click.Path(exists=True, dir_okay=False),
    help="Manifest JSON for a model file [default: the .json of the same name next to it].",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Also keep the signed bundle here.")
@json_option
@click.pass_context
def model_publish(ctx: click.Context, /, src: str, **opts: Any) -> None:
    """Package, sign and upload MODEL_OR_MANIFEST in one step (for CI; needs an operator
    token). The lineage options go into the signed manifest, merged over the manifest's
    own lineage object; `edgefleet model show NAME@VERSION --json` and the API return it."""
    try:
        _publish(ctx, Path(src), opts)
    except PublishError as err:
        click.echo(f"error: {err}", err=True)
        ctx.exit(err.code)
    except ControllerError as err:  # packaging, the key file, the CLI config
        click.echo(f"error: {err}", err=True)
        ctx.exit(EXIT_CONFIG)
