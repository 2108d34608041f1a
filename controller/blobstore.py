"""Content-addressed file store for model bundles: ``{root}/sha256/{ab}/{sha256}.efb``.

Uploads are written to ``{root}/tmp`` while they are hashed, then moved into place with
an atomic rename (same filesystem), so a reader never sees a partial blob. This is the
``local`` backend of :mod:`controller.artifacts`; with the others ``{root}/tmp`` still stages
uploads while they are checked.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.atomic import move_into_place
from controller.config import LoadedConfig

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from controller.artifacts.base import BundleStore, StorageKind
    from controller.db.session import Database

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """Bundles by the sha256 of the file; each kept once."""

    kind: Literal["local"] = "local"
    transactional = False

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

    # --- controller.artifacts.BundleStore -------------------------------------------------

    def stored_size(self, sha256: str) -> int | None:
        path = self.path_for(sha256)
        return path.stat().st_size if path.is_file() else None

    def put(self, src: Path, sha256: str, size: int, conn: Connection | None = None) -> None:
        """Move ``src`` into place when it is under ``{root}/tmp``, else copy it."""
        if self.exists(sha256):
            return
        if src.parent == self.root / "tmp":
            self.commit(src, sha256)
            return
        import shutil

        tmp = self.temp_file()
        try:
            shutil.copyfile(src, tmp)
            self.commit(tmp, sha256)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        from controller.artifacts.base import file_blocks

        return file_blocks(self.path_for(sha256), start, length)

    def redirect_url(self, sha256: str) -> str | None:
        return None

    def cached(self, sha256: str) -> bytes | None:
        return None  # the page cache keeps the file; reads are cheap

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def describe(self) -> str:
        return f"the blob directory {self.root}"


@dataclass(frozen=True, slots=True)
class ModelHosting:
    """What the models API needs: the blob store, the upload limit and the trusted keys.

    The service puts one on ``app.state.models``; without it the models API answers 503.
    """

    blobs: BlobStore
    """Stages uploads (``{root}/tmp``); also the bundle store when ``store`` is None."""
    max_bundle_bytes: int
    trusted_keys: list[Ed25519PublicKey] = field(default_factory=list)
    store: BundleStore | None = None
    """Where bundles are kept (``models.storage``); None = ``blobs`` (``local``)."""

    @property
    def bundles(self) -> BundleStore:
        return self.store if self.store is not None else self.blobs

    def holder(self, sha256: str) -> tuple[BundleStore, int | None]:
        """The store to read ``sha256`` from and its stored size (None: in no store).

        With ``database`` a bundle not migrated yet is still read from the blob directory
        (``edgefleet model migrate-storage`` moves it); ``s3`` redirects without looking.
        """
        primary = self.bundles
        size = primary.stored_size(sha256)
        if size is None and primary.kind == "database":
            local = self.blobs.stored_size(sha256)
            if local is not None:
                return self.blobs, local
        return primary, size


def hosting_from_config(loaded: LoadedConfig, database: Database | None = None) -> ModelHosting:
    """Build the models API's settings from the controller config (loads trusted keys);
    ``database`` is the controller's, where ``models.storage`` is ``database``."""
    from controller.keys import load_public_key

    models = loaded.config.models
    keys = [load_public_key(loaded.resolve(p)) for p in models.trusted_keys]
    blobs = BlobStore(loaded.blob_dir)
    kind = loaded.bundle_storage
    return ModelHosting(
        blobs=blobs,
        max_bundle_bytes=models.max_bundle_bytes,
        trusted_keys=keys,
        store=blobs if kind == "local" else open_store(kind, loaded, database),
    )


def open_store(
    kind: StorageKind, loaded: LoadedConfig, database: Database | None = None
) -> BundleStore:
    """The bundle store ``kind`` as configured in ``loaded``: the blob directory for
    ``local``, else :func:`controller.artifacts.open_remote_store`."""
    if kind == "local":
        return BlobStore(loaded.blob_dir)
    from controller.artifacts import open_remote_store

    return open_remote_store(kind, loaded, database)
