"""Build model bundles (docs/bundles.md) for tests, signed with ``cryptography`` ed25519.

Independent of controller/ on purpose: the agent's verifier is tested against bundles built
straight from the format description. ``tamper`` hooks let tests build broken bundles.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import Manifest, ModelFile, encode_manifest

ASSETS = Path(__file__).resolve().parent.parent / "inference" / "assets"


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return path


def with_files(manifest: Manifest, files: Mapping[str, bytes]) -> Manifest:
    """``manifest`` with ``files`` listing exactly ``files`` (sha256 and size)."""
    listed = [
        ModelFile(path=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        for name, data in sorted(files.items())
    ]
    return msgspec.structs.replace(manifest, files=listed)


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(encode_manifest(manifest))).decode("ascii")


def build_bundle(
    out: Path,
    manifest: Manifest,
    files: Mapping[str, bytes],
    *,
    key: Ed25519PrivateKey | None,
    gzip: bool = True,
    list_files: bool = True,
    extra_members: Callable[[tarfile.TarFile], None] | None = None,
    replace_content: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a bundle to ``out``: manifest.json, manifest.sig (when ``key``), ``files``.

    ``list_files`` recomputes ``manifest.files`` from ``files``; ``replace_content`` swaps a
    member's bytes after signing (tampering); ``extra_members`` adds raw tar members.
    """
    if list_files:
        manifest = with_files(manifest, files)
    manifest_bytes = encode_manifest(manifest)
    members: list[tuple[str, bytes]] = [("manifest.json", manifest_bytes)]
    if key is not None:
        members.append(("manifest.sig", (sign(manifest, key) + "\n").encode()))
    for name, data in files.items():
        members.append((name, (replace_content or {}).get(name, data)))
    with tarfile.open(out, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        if extra_members is not None:
            extra_members(tar)
    return out


def blazeface_manifest(**changes: object) -> Manifest:
    """The shipped blazeface-short-int8 manifest as a bundle manifest (files recomputed)."""
    raw = msgspec.json.decode((ASSETS / "blazeface-short-int8.json").read_bytes())
    raw.update(changes)
    return msgspec.convert(raw, type=Manifest)


def blazeface_files() -> dict[str, bytes]:
    return {"blazeface-short-int8.tflite": (ASSETS / "blazeface-short-int8.tflite").read_bytes()}
