"""Open, verify and extract a model bundle (``.efb``, see docs/bundles.md).

:func:`open_bundle` reads the tar archive (plain or gzip, detected by magic bytes) without
extracting anything: it rejects unsafe or unexpected members, checks the ed25519 signature
over the canonical manifest with any trusted key, streams every member's sha256 and size
against the manifest and checks compatibility. :func:`extract` then writes the files into a
fresh temporary folder next to the destination, fsyncs them and renames the folder into place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.ota import OtaError
from common.atomic import fsync_dir
from protocol import Manifest, ProtocolError, decode_manifest, encode_manifest
from protocol.manifest import check_relative_path

__all__ = [
    "BundleError",
    "VerifiedBundle",
    "extract",
    "load_trusted_keys",
    "open_bundle",
    "version_tuple",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
_MAX_MANIFEST = 1 << 20
_VERSION = re.compile(r"\d+(\.\d+)*")


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


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_trusted_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    """Read ed25519 public keys (SubjectPublicKeyInfo PEM); BundleError naming the bad file."""
    keys: list[Ed25519PublicKey] = []
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
            key = load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as err:
            raise BundleError(
                "bad_trusted_key",
                f"trusted key {path} is not a PEM public key ({err}); use the signing.pub "
                "written by `edgefleet keys generate`",
            ) from err
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(
                "bad_trusted_key",
                f"trusted key {path} is a {type(key).__name__}, not ed25519; use the "
                "signing.pub written by `edgefleet keys generate`",
            )
        keys.append(key)
    return keys


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``; a pre-release/build suffix after ``-``/``+`` is ignored."""
    core = re.split(r"[-+]", version.strip().lstrip("vV"), maxsplit=1)[0]
    if not _VERSION.fullmatch(core):
        raise ValueError(f"not a dotted numeric version: {version!r}")
    parts = [int(p) for p in core.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def open_bundle(
    path: Path,
    *,
    trusted_keys: list[Ed25519PublicKey],
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
            kid = _check_signature(manifest, sig_text, trusted_keys, path)
            _check_listing(manifest, by_name, path)
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
    _check_compatibility(manifest, path, agent_version=agent_version, runtimes=runtimes, arch=arch)
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
                "allowed; rebuild the bundle with `edgefleet bundle build`",
            )
        try:
            check_relative_path(name)
        except ProtocolError as err:
            raise BundleError("unsafe_member", f"bundle {path}: {err}") from err
        if name.startswith("./") or "//" in name or name.endswith("/"):
            raise BundleError(
                "unsafe_member", f"bundle {path} has a non-canonical member name {name!r}"
            )
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
            "`edgefleet bundle build --key`",
        )
    if member.size > _MAX_MANIFEST:
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


def _check_signature(
    manifest: Manifest, sig_text: bytes, keys: list[Ed25519PublicKey], path: Path
) -> str:
    try:
        signature = base64.b64decode(sig_text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleError(
            "bad_signature", f"bundle {path}: manifest.sig is not base64 ({err})"
        ) from err
    message = encode_manifest(manifest)
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return key_id(key)
    raise BundleError(
        "bad_signature",
        f"bundle {path} ({manifest.ref}) is not signed by any of the {len(keys)} trusted "
        "key(s): sign it with a trusted key or add its public key to [ota] trusted_keys",
    )


def _check_listing(manifest: Manifest, by_name: dict[str, tarfile.TarInfo], path: Path) -> None:
    listed = {f.path for f in manifest.files}
    if len(listed) != len(manifest.files):
        raise BundleError("bad_manifest", f"bundle {path}: manifest lists a file twice")
    extra = sorted(set(by_name) - listed - {MANIFEST_NAME, SIGNATURE_NAME})
    if extra:
        raise BundleError(
            "unexpected_member",
            f"bundle {path} contains {extra}, not listed in its manifest: rebuild the bundle",
        )
    missing = sorted(listed - set(by_name))
    if missing:
        raise BundleError("missing_file", f"bundle {path} lacks {missing}, listed in its manifest")
    if manifest.model not in listed:
        raise BundleError(
            "bad_manifest", f"bundle {path}: model {manifest.model!r} is not listed in files"
        )
    for sample in manifest.golden:
        if sample.image not in listed:
            raise BundleError(
                "bad_manifest",
                f"bundle {path}: golden image {sample.image!r} is not listed in files",
            )


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


def _check_compatibility(
    manifest: Manifest, path: Path, *, agent_version: str, runtimes: set[str], arch: str
) -> None:
    compat = manifest.compatibility
    if compat.min_agent_version is not None:
        try:
            too_old = version_tuple(agent_version) < version_tuple(compat.min_agent_version)
        except ValueError as err:
            raise BundleError("incompatible", f"bundle {path}: {err}") from err
        if too_old:
            raise BundleError(
                "incompatible",
                f"{manifest.ref} needs agent {compat.min_agent_version} or newer, this is "
                f"{agent_version}: upgrade the agent first",
            )
    if manifest.runtime not in _families(runtimes):
        raise BundleError(
            "incompatible",
            f"{manifest.ref} needs the {manifest.runtime} runtime, this device has "
            f"{sorted(runtimes)}: install it or pick another model",
        )
    if compat.runtimes and not (set(compat.runtimes) & _families(runtimes)):
        raise BundleError(
            "incompatible",
            f"{manifest.ref} supports runtimes {compat.runtimes}, this device has "
            f"{sorted(runtimes)}",
        )
    if compat.architectures and arch not in compat.architectures:
        raise BundleError(
            "incompatible",
            f"{manifest.ref} supports architectures {compat.architectures}, this device is "
            f"{arch}: pick a build for {arch}",
        )


def _families(runtimes: set[str]) -> set[str]:
    """litert and tflite run the same models."""
    out = set(runtimes)
    if out & {"litert", "tflite"}:
        out |= {"litert", "tflite"}
    return out
