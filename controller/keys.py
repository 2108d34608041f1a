"""Ed25519 signing keys for model bundles (docs/bundles.md, "Keys").

``signing.key`` is PKCS#8 PEM (mode 0600), ``signing.pub`` SubjectPublicKeyInfo PEM. The
key id is the first 16 hex digits of sha256 over the raw 32-byte public key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controller.errors import ControllerError
from protocol.bundle import key_id

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SigningKeyError(ControllerError):
    """A signing key is missing, unreadable or not an ed25519 key."""


def generate_keys(out_dir: Path) -> tuple[Path, Path, str]:
    """Write a new key pair into ``out_dir``; refuse to overwrite. Returns (key, pub, key id)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    for p in (key_path, pub_path):
        if p.exists():
            raise SigningKeyError(
                f"{p} already exists; refusing to overwrite a signing key (devices trust it). "
                "Choose another --out folder or move the old keys away first"
            )
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub_pem)
    return key_path, pub_path, key_id(private.public_key())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SigningKeyError(
            f"cannot read {what} {path}: {err.strerror}; create keys with "
            "`edgefleet keys generate --out DIR`"
        ) from err


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(
            f"{path} is not an unencrypted PKCS#8 PEM private key: {err}"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an ed25519 key; bundles are signed with ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"{path} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an ed25519 public key")
    return key
