"""Where model bundles are kept: one interface, three backends.

- ``local``: :class:`controller.blobstore.BlobStore`, files under ``models.blob_dir`` on one
  controller's disk (the default with SQLite).
- ``database``: :class:`controller.artifacts.database.DatabaseBundleStore`, chunked rows in the
  controller's database, written in the upload's transaction (the default with PostgreSQL:
  every replica reaches them).
- ``s3``: :class:`controller.artifacts.s3.S3BundleStore`, objects in an S3-compatible bucket;
  devices download through short-lived presigned URLs (the bytes bypass the controller).

Bundles are addressed by their sha256; a bundle shared by several model versions is kept once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.artifacts.base import (
    KINDS,
    READ_BLOCK,
    BundleStore,
    StorageError,
    StorageKind,
    file_blocks,
    open_bundle_stream,
)

if TYPE_CHECKING:
    from controller.config import LoadedConfig
    from controller.db.session import Database

__all__ = [
    "KINDS",
    "READ_BLOCK",
    "BundleStore",
    "StorageError",
    "StorageKind",
    "file_blocks",
    "open_bundle_stream",
    "open_remote_store",
]


def open_remote_store(
    kind: StorageKind, loaded: LoadedConfig, database: Database | None = None
) -> BundleStore:
    """The ``database`` or ``s3`` backend as configured in ``loaded`` (``database`` needs
    ``database``); ``local`` is :func:`controller.blobstore.open_store`'s."""
    if kind == "database":
        from controller.artifacts.database import DatabaseBundleStore

        if database is None:
            raise StorageError("models.storage = database needs the controller's database")
        models = loaded.config.models
        return DatabaseBundleStore(
            database, chunk_bytes=models.chunk_bytes, cache_bytes=models.cache_bytes
        )
    if kind == "s3":
        from controller.artifacts.s3 import S3BundleStore

        return S3BundleStore.from_config(loaded.config.models.s3)
    raise StorageError(f"{kind!r} is not a remote bundle store (database, s3)")
