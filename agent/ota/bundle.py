"""Open, verify and extract a model bundle (``.efb``, see docs/bundles.md).

:func:`open_bundle` reads the tar archive (plain or gzip, detected by magic bytes) without
extracting anything: it rejects unsafe or unexpected members, checks the ed25519 signature
over the canonical manifest with any trusted key (the rules are :mod:`protocol.bundle`'s), streams every member's sha256 and size
against the manifest and checks compatibility. :func:`extract` then writes the files into a
fresh temporary folder next to the destination, fsyncs them and renames the folder into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.ota import OtaError
from common.atomic import fsync_dir
from protocol import Manifest, ProtocolError, decode_manifest
from protocol import bundle as bundle_format
from protocol.bundle import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    BundleFormatError,
    ed25519_public_from_pem,
    key_id,
    version_tuple,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "BundleError",
    "VerifiedBundle",
    "extract",
    "key_id",
    "load_trusted_keys",
    "open_bundle",
    "version_tuple",
]

log = logging.getLogger(__name__)


class BundleError(OtaError):
    """A bundle is malformed, unsigned, tampered with or incompatible (see ``reason``)."""


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    """``manifest.json`` exactly as stored in the bundle."""
    signature: str
    """Base64 ed25519 signature (``manifest.sig``)."""
    key_id: str
    """Id of the trusted key that verified the signature (16 hex digits)."""


def load_trusted_keys(paths: Iterable[Path]) -> list[bytes]:
    """Read ed25519 public keys (SubjectPublicKeyInfo PEM) as their raw 32 bytes; BundleError
    naming the bad file. cryptography is loaded only when a bundle's signature is checked."""
    keys: list[bytes] = []
    for given in paths:
        path = Path(given)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BundleError(
                "bad_trusted_key",
                f"cannot read trusted key {path}: {err.strerror}; check [ota] trusted_keys "
                "in the agent config",
            ) from err
        try:
            keys.append(ed25519_public_from_pem(data))
        except ValueError as err:
            raise BundleError(
                "bad_trusted_key",
                f"trusted key {path} is not a PEM ed25519 public key ({err}); use the "
                "signing.pub written by `edgefleet keys generate`",
            ) from err
    return keys


def open_bundle(
    path: Path,
    *,
    trusted_keys: Sequence[Ed25519PublicKey | bytes],
    agent_version: str,
    runtimes: set[str],
    arch: str,
) -> VerifiedBundle:
    """Verify the bundle at ``path`` completely without extracting it; BundleError otherwise.

    Reasons: ``bad_archive``, ``unsafe_member``, ``unexpected_member``, ``missing_file``,
    ``bad_manifest``, ``unsigned``, ``bad_signature``, ``file_hash_mismatch``,
    ``incompatible``.
    """
    path = Path(path)
    try:
        with tarfile.open(path, mode="r:*") as tar:
            members = tar.getmembers()
            by_name = _check_members(path, members)
            manifest_bytes = _read_small(tar, by_name, MANIFEST_NAME, path, missing="unsigned")
            sig_text = _read_small(tar, by_name, SIGNATURE_NAME, path, missing="unsigned")
            manifest = _decode(manifest_bytes, path)
            try:
                kid = bundle_format.verify_signature(manifest, sig_text, trusted_keys)
                bundle_format.check_listing(manifest, by_name)
            except BundleFormatError as err:
                raise _format(path, err) from err
            listed = {f.path: f for f in manifest.files}
            for member in members:  # archive order: no backward seeks in a gzip stream
                entry = listed.get(member.name)
                if entry is not None:
                    _check_file(tar, member, entry.sha256, entry.size, path)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BundleError(
            "bad_archive",
            f"bundle {path} is not a readable tar archive ({err}); download it again",
        ) from err
    try:
        bundle_format.check_compatibility(
            manifest, agent_version=agent_version, runtimes=runtimes, arch=arch
        )
    except BundleFormatError as err:
        raise _format(path, err) from err
    signature = sig_text.decode("ascii").strip()
    log.info("bundle %s (%s) verified with key %s", path, manifest.ref, kid)
    return VerifiedBundle(
        path=path,
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signature=signature,
        key_id=kid,
    )


def extract(verified: VerifiedBundle, dest_dir: Path) -> Path:
    """Write the bundle's files into ``dest_dir`` (which must not exist yet); return it.

    Files go into a fresh temporary folder next to ``dest_dir`` and are re-checked while
    written (the archive could have changed since :func:`open_bundle`), fsynced, and the
    folder is renamed into place. Nothing is written outside ``dest_dir``'s parent.
    """
    dest_dir = Path(dest_dir)
    if dest_dir.exists():
        raise BundleError(
            "extract_failed", f"cannot extract into {dest_dir}: it already exists; remove it first"
        )
    parent = dest_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{dest_dir.name}.{secrets.token_hex(4)}.extract"
    tmp.mkdir()
    try:
        _write_file(tmp / MANIFEST_NAME, verified.manifest_bytes)
        _write_file(tmp / SIGNATURE_NAME, verified.signature.encode("ascii") + b"\n")
        wanted = {f.path: f for f in verified.manifest.files}
        with tarfile.open(verified.path, mode="r:*") as tar:
            for member in tar:
                entry = wanted.get(member.name)
                if entry is None:
                    continue
                target = tmp.joinpath(*entry.path.split("/"))
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise BundleError(
                        "unsafe_member", f"bundle member {member.name!r} escapes the folder"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                source = tar.extractfile(member)
                if source is None:
                    raise BundleError("unsafe_member", f"member {member.name!r} is not a file")
                size = 0
                with source, target.open("xb") as out:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                if digest.hexdigest() != entry.sha256.lower() or size != entry.size:
                    raise BundleError(
                        "file_hash_mismatch",
                        f"bundle {verified.path} changed while being extracted "
                        f"({member.name}); download it again",
                    )
                del wanted[member.name]
        if wanted:
            raise BundleError(
                "missing_file",
                f"bundle {verified.path} lost {sorted(wanted)} since it was verified; "
                "download it again",
            )
        for folder in sorted({p.parent for p in tmp.rglob("*")}, key=lambda p: -len(p.parts)):
            fsync_dir(folder)
        os.rename(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return dest_dir


def _write_file(path: Path, data: bytes) -> None:
    with path.open("xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _check_members(path: Path, members: list[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    by_name: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = member.name
        if not member.isreg():
            kind = "directory" if member.isdir() else "link or special file"
            raise BundleError(
                "unsafe_member",
                f"bundle {path} contains {name!r}, a {kind}: only regular files are "
                "allowed; rebuild the bundle with `edgefleet model package`",
            )
        try:
            bundle_format.check_member_name(name)
        except BundleFormatError as err:
            raise _format(path, err) from err
        if name in by_name:
            raise BundleError(
                "unsafe_member",
                f"bundle {path} contains {name!r} twice; rebuild the bundle",
            )
        by_name[name] = member
    return by_name


def _read_small(
    tar: tarfile.TarFile,
    by_name: dict[str, tarfile.TarInfo],
    name: str,
    path: Path,
    *,
    missing: str,
) -> bytes:
    member = by_name.get(name)
    if member is None:
        raise BundleError(
            missing,
            f"bundle {path} has no {name}: only signed bundles are installed; sign it with "
            "`edgefleet model sign BUNDLE --key signing.key`",
        )
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError("bad_manifest", f"bundle {path}: {name} is too large")
    source = tar.extractfile(member)
    if source is None:
        raise BundleError("unsafe_member", f"bundle {path}: {name} is not a regular file")
    with source:
        return source.read()


def _decode(data: bytes, path: Path) -> Manifest:
    try:
        return decode_manifest(data)
    except ProtocolError as err:
        raise BundleError("bad_manifest", f"bundle {path}: {err}") from err


def _format(path: Path, err: BundleFormatError) -> BundleError:
    return BundleError(err.reason, f"bundle {path}: {err}")


def _check_file(
    tar: tarfile.TarFile, member: tarfile.TarInfo, sha256: str, size: int, path: Path
) -> None:
    if member.size != size:
        raise BundleError(
            "file_hash_mismatch",
            f"bundle {path}: {member.name} has {member.size} bytes, the manifest says {size}",
        )
    source = tar.extractfile(member)
    if source is None:
        raise BundleError("unsafe_member", f"bundle {path}: {member.name} is not a file")
    digest = hashlib.sha256()
    with source:
        while block := source.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != sha256.lower():
        raise BundleError(
            "file_hash_mismatch",
            f"bundle {path}: sha256 of {member.name} does not match the manifest; the "
            "bundle was corrupted or tampered with, download it again",
        )
