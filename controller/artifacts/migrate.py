"""``edgefleet model migrate-storage``: copy every model's bundle from one store to another.

Idempotent: a bundle already in the target whose sha256 checks out is left alone (a damaged
one is copied again). Every copy is read back from the target and its sha256 compared before
it counts; the source copy is removed only with ``delete_source`` and only after that check.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from controller.artifacts.base import BundleStore, StorageError
from controller.blobstore import BlobStore
from controller.db.models import models
from controller.db.session import Database


@dataclass
class MigrationReport:
    bundles: int = 0
    copied: int = 0
    bytes_copied: int = 0
    already: int = 0
    deleted: int = 0
    missing: list[str] = field(default_factory=list)
    """``name@version`` of models whose bundle is in neither store."""


def model_bundles(database: Database) -> list[tuple[str, int, list[str]]]:
    """(sha256, size, refs) of every distinct bundle the models table names."""
    with database.connect() as conn:
        rows = conn.execute(
            select(models.c.sha256, func.max(models.c.size), models.c.name, models.c.version)
            .group_by(models.c.sha256, models.c.name, models.c.version)
            .order_by(models.c.sha256)
        ).all()
    found: dict[str, tuple[int, list[str]]] = {}
    for sha, size, name, version in rows:
        found.setdefault(sha, (int(size), []))[1].append(f"{name}@{version}")
    return [(sha, size, refs) for sha, (size, refs) in found.items()]


def stored_sha256(store: BundleStore, sha256: str, size: int) -> str:
    digest = hashlib.sha256()
    for block in store.read(sha256, 0, size):
        digest.update(block)
    return digest.hexdigest()


def migrate_storage(
    database: Database,
    source: BundleStore,
    target: BundleStore,
    *,
    delete_source: bool = False,
    scratch: Path | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> MigrationReport:
    """Copy every model's bundle from ``source`` to ``target``, verified; see the module."""
    if source.kind == target.kind:
        raise StorageError(f"source and target are both {source.kind}: nothing to migrate")
    report = MigrationReport()
    for sha, size, refs in model_bundles(database):
        report.bundles += 1
        if _present(target, sha, size):
            report.already += 1
        elif source.stored_size(sha) != size:
            report.missing.extend(refs)
            progress(f"missing: {sha} ({', '.join(refs)}) is not in {source.describe()}")
            continue
        else:
            _copy(source, target, sha, size, scratch)
            report.copied += 1
            report.bytes_copied += size
            progress(f"copied {sha} ({', '.join(refs)}, {size} bytes)")
        if delete_source and source.stored_size(sha) is not None:
            source.delete(sha)
            report.deleted += 1
    return report


def _present(store: BundleStore, sha: str, size: int) -> bool:
    have = store.stored_size(sha)
    if have is None:
        return False
    if have == size and stored_sha256(store, sha, size) == sha:
        return True
    store.delete(sha)  # a damaged or partial copy: copy it again
    return False


def _copy(
    source: BundleStore, target: BundleStore, sha: str, size: int, scratch: Path | None
) -> None:
    if isinstance(source, BlobStore):
        target.put(source.path_for(sha), sha, size)
    else:
        with tempfile.TemporaryDirectory(prefix="edgefleet-migrate-", dir=scratch) as tmp:
            local = Path(tmp) / f"{sha}.efb"
            digest = hashlib.sha256()
            with local.open("wb") as f:
                for block in source.read(sha, 0, size):
                    digest.update(block)
                    f.write(block)
            if digest.hexdigest() != sha:
                raise StorageError(
                    f"bundle {sha} in {source.describe()} has sha256 {digest.hexdigest()}: the "
                    "source copy is damaged; upload the model again"
                )
            target.put(local, sha, size)
    got = stored_sha256(target, sha, size)
    if got != sha:
        target.delete(sha)
        raise StorageError(
            f"bundle {sha} read back from {target.describe()} has sha256 {got}: the copy was "
            "deleted; nothing was removed from the source. Check the target and run again"
        )
