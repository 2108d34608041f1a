"""The model bundle format (``.efb``, docs/bundles.md): the rules the controller that builds
and accepts bundles and the agent that installs them must agree on.

A bundle is a tar archive (plain or gzip) of regular files only: ``manifest.json``,
``manifest.sig`` and every file listed in ``manifest.files`` with its sha256 and size, and
nothing else. ``manifest.sig`` is the base64 ed25519 signature over the canonical manifest
bytes (:func:`signing_payload`); a key is known by its id, the first 16 hex digits of the
sha256 of its raw 32-byte public key.

Everything here works on names and bytes already in memory; reading the archive is the
caller's business. Errors are :class:`BundleFormatError` with a machine-readable
``reason`` (the same codes the agent reports in its events).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING

from protocol.errors import ProtocolError
from protocol.manifest import Manifest, check_relative_path, encode_manifest

if TYPE_CHECKING:
    # cryptography is imported where a signature is made or checked, not at import: a device
    # checks a signature only when an update arrives, and the library costs it about 8 MB.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SIGNATURE_NAME",
    "BundleFormatError",
    "check_compatibility",
    "check_listing",
    "check_member_name",
    "ed25519_public_from_pem",
    "key_id",
    "runtime_families",
    "sign_manifest",
    "signing_payload",
    "verify_signature",
    "version_tuple",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
"""``manifest.json`` and ``manifest.sig`` larger than this are refused unread."""

_VERSION = re.compile(r"\d+(\.\d+)*")


class BundleFormatError(ProtocolError):
    """A bundle breaks a rule of the format; ``reason`` says which (``unsafe_member``,
    ``unexpected_member``, ``missing_file``, ``bad_manifest``, ``unsigned``,
    ``bad_signature``, ``incompatible``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
"""DER of an ed25519 SubjectPublicKeyInfo (RFC 8410) before its 32 raw key bytes."""
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", re.DOTALL)


def ed25519_public_from_pem(data: bytes) -> bytes:
    """The raw 32-byte key of an ed25519 public key in PEM (SubjectPublicKeyInfo, as
    ``edgefleet keys generate`` writes ``signing.pub``); ValueError saying what it is instead.

    Standard library only: an agent reads its trusted keys at start without loading
    cryptography (RFC 8410 fixes the encoding: a 12-byte prefix and the key).
    """
    match = _PEM_PUBLIC.search(data)
    if match is None:
        kind = re.search(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)
        found = f"a PEM {kind.group(1).decode()}" if kind else "no PEM block"
        raise ValueError(f"expected a PEM PUBLIC KEY block, found {found}")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"the PEM block is not valid base64: {err}") from err
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise ValueError(
            f"it is not an ed25519 public key ({len(der)} bytes of DER; an ed25519 key is 44, "
            "starting with the algorithm id 1.3.101.112)"
        )
    return der[len(_ED25519_SPKI_PREFIX) :]


def key_id(key: Ed25519PublicKey | bytes) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte public key (``key`` as a key object
    or as those raw bytes)."""
    if not isinstance(key, bytes):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(key).hexdigest()[:16]


def signing_payload(manifest: Manifest) -> bytes:
    """The bytes a signature covers: the canonical encoding of the manifest."""
    return encode_manifest(manifest)


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> str:
    """The base64 text of ``manifest.sig`` for ``manifest``."""
    return base64.b64encode(key.sign(signing_payload(manifest))).decode("ascii")


def verify_signature(
    manifest: Manifest, signature: str | bytes | None, keys: Sequence[Ed25519PublicKey | bytes]
) -> str:
    """The id of the first of ``keys`` whose signature ``signature`` is over ``manifest``.

    ``unsigned`` when there is no signature, ``bad_signature`` when it is not base64 or no
    key verifies it (the message lists the key ids tried).
    """
    if signature is None:
        raise BundleFormatError(
            "unsigned",
            f"the bundle is not signed (no {SIGNATURE_NAME}): only signed bundles are "
            "installed; sign it with `edgefleet model sign FILE --key signing.key`",
        )
    text = signature.strip() if isinstance(signature, bytes) else signature.strip().encode()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleFormatError(
            "bad_signature", f"{SIGNATURE_NAME} is not valid base64: {err}"
        ) from err
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    payload = signing_payload(manifest)
    for key in keys:
        public = Ed25519PublicKey.from_public_bytes(key) if isinstance(key, bytes) else key
        try:
            public.verify(raw, payload)
        except InvalidSignature:
            continue
        return key_id(key)
    ids = ", ".join(key_id(k) for k in keys) or "none given"
    raise BundleFormatError(
        "bad_signature",
        f"{manifest.ref}: the signature does not verify with any trusted key ({ids}): the "
        "manifest was modified after signing or it was signed with another key; sign it "
        "with a trusted key or trust its public key",
    )


def check_member_name(name: str) -> None:
    """A member name must be a canonical relative path inside the bundle."""
    try:
        check_relative_path(name)
    except ProtocolError as err:
        raise BundleFormatError(
            "unsafe_member",
            f"unsafe member name {name!r}: absolute paths and '..' are not allowed ({err}); "
            "rebuild the bundle with `edgefleet model package`",
        ) from err
    if name.startswith("./") or "//" in name or name.endswith("/"):
        raise BundleFormatError(
            "unsafe_member",
            f"non-canonical member name {name!r}; rebuild the bundle with "
            "`edgefleet model package`",
        )


def check_listing(manifest: Manifest, members: Collection[str]) -> None:
    """The archive holds exactly the listed files (plus manifest and signature)."""
    listed = [f.path for f in manifest.files]
    if len(set(listed)) != len(listed):
        raise BundleFormatError("bad_manifest", "the manifest lists a file twice")
    if manifest.model not in listed:
        raise BundleFormatError(
            "bad_manifest", f"the manifest's model {manifest.model!r} is not listed in its files"
        )
    for sample in manifest.golden:
        if sample.image not in listed:
            raise BundleFormatError(
                "bad_manifest",
                f"golden image {sample.image!r} is not listed in the manifest's files",
            )
    extra = sorted(set(members) - set(listed) - {MANIFEST_NAME, SIGNATURE_NAME})
    if extra:
        raise BundleFormatError(
            "unexpected_member",
            f"member {extra[0]!r} is not listed in the manifest (unlisted: {extra}); every "
            "file of a bundle must be listed with its sha256 and size: rebuild the bundle",
        )
    missing = sorted(set(listed) - set(members))
    if missing:
        raise BundleFormatError(
            "missing_file",
            f"file {missing[0]!r} is listed in the manifest but missing (missing: {missing})",
        )


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``; a pre-release/build suffix after ``-``/``+`` is ignored."""
    core = re.split(r"[-+]", version.strip().lstrip("vV"), maxsplit=1)[0]
    if not _VERSION.fullmatch(core):
        raise ValueError(f"not a dotted numeric version: {version!r}")
    parts = [int(p) for p in core.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def runtime_families(runtimes: Iterable[str]) -> set[str]:
    """The runtimes a device can serve: litert and tflite run the same models."""
    out = set(runtimes)
    if out & {"litert", "tflite"}:
        out |= {"litert", "tflite"}
    return out


def check_compatibility(
    manifest: Manifest, *, agent_version: str, runtimes: Iterable[str], arch: str
) -> None:
    """``incompatible`` unless a device with this agent, runtimes and CPU can run the model."""
    compat = manifest.compatibility
    have = sorted(set(runtimes))
    families = runtime_families(have)
    if compat.min_agent_version is not None:
        try:
            too_old = version_tuple(agent_version) < version_tuple(compat.min_agent_version)
        except ValueError as err:
            raise BundleFormatError("incompatible", str(err)) from err
        if too_old:
            raise BundleFormatError(
                "incompatible",
                f"{manifest.ref} needs agent {compat.min_agent_version} or newer, this is "
                f"{agent_version}: upgrade the agent first",
            )
    if manifest.runtime not in families:
        raise BundleFormatError(
            "incompatible",
            f"{manifest.ref} needs the {manifest.runtime} runtime, this device has {have}: "
            "install it or pick another model",
        )
    if compat.runtimes and not (set(compat.runtimes) & families):
        raise BundleFormatError(
            "incompatible",
            f"{manifest.ref} supports runtimes {compat.runtimes}, this device has {have}",
        )
    if compat.architectures and arch not in compat.architectures:
        raise BundleFormatError(
            "incompatible",
            f"{manifest.ref} supports architectures {compat.architectures}, this device is "
            f"{arch}: pick a build for {arch}",
        )
