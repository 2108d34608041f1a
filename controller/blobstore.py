"""Content-addressed file store for model bundles: ``{root}/sha256/{ab}/{sha256}.efb``.

Uploads are written to ``{root}/tmp`` while they are hashed, then moved into place with
an atomic rename (same filesystem), so a reader never sees a partial blob.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.atomic import move_into_place
from controller.config import LoadedConfig

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """Bundles by the sha256 of the file; each kept once."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / f"{sha256}.efb"

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def temp_file(self) -> Path:
        """A new empty file under ``{root}/tmp`` (the caller removes it or ``commit``s it)."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=tmp_dir)
        os.close(fd)
        return Path(name)

    def commit(self, tmp: Path, sha256: str) -> Path:
        """Move a fully written temp file into place (keeps the existing copy if any)."""
        dest = self.path_for(sha256)
        if dest.is_file():
            tmp.unlink(missing_ok=True)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(tmp, dest)
        return dest


@dataclass(frozen=True, slots=True)
class ModelHosting:
    """What the models API needs: the blob store, the upload limit and the trusted keys.

    The service puts one on ``app.state.models``; without it the models API answers 503.
    """

    blobs: BlobStore
    max_bundle_bytes: int
    trusted_keys: list[Ed25519PublicKey] = field(default_factory=list)


def hosting_from_config(loaded: LoadedConfig) -> ModelHosting:
    """Build the models API's settings from the controller config (loads trusted keys)."""
    from controller.keys import load_public_key

    models = loaded.config.models
    keys = [load_public_key(loaded.resolve(p)) for p in models.trusted_keys]
    return ModelHosting(
        blobs=BlobStore(loaded.blob_dir),
        max_bundle_bytes=models.max_bundle_bytes,
        trusted_keys=keys,
    )
