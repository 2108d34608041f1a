"""The bundle store interface shared by the backends (no backend imported here)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from controller.errors import ControllerError

if TYPE_CHECKING:
    from sqlalchemy import Connection


StorageKind = Literal["local", "database", "s3"]
KINDS: tuple[StorageKind, ...] = ("local", "database", "s3")
READ_BLOCK = 1 << 20


class StorageError(ControllerError):
    """The bundle store cannot do what was asked (unreachable, misconfigured, missing)."""


class BundleStore(Protocol):
    """What the models API, the console and ``model migrate-storage`` need of a backend."""

    @property
    def kind(self) -> StorageKind: ...

    @property
    def transactional(self) -> bool:
        """True: ``put`` must get the connection of the transaction that adds the model row."""
        ...

    def stored_size(self, sha256: str) -> int | None:
        """Bytes stored for ``sha256``; None when the bundle is not there."""
        ...

    def put(self, src: Path, sha256: str, size: int, conn: Connection | None = None) -> None:
        """Store the verified file ``src`` (kept when the same bundle is stored already)."""
        ...

    def read(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        """Stream ``length`` bytes from ``start`` (blocks of at most a few MiB)."""
        ...

    def redirect_url(self, sha256: str) -> str | None:
        """A short-lived URL devices download from instead of the controller (S3), or None."""
        ...

    def cached(self, sha256: str) -> bytes | None:
        """The whole bundle when this store holds it in memory (the database store's cache),
        so it is answered without a read; None otherwise."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove the bundle (nothing when it is not there)."""
        ...

    def describe(self) -> str:
        """Where the bundles are, for messages (``s3://bucket/prefix``, a folder, ...)."""
        ...


def file_blocks(path: Path, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of ``path`` from ``start``, in blocks of READ_BLOCK."""
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            block = f.read(min(READ_BLOCK, left))
            if not block:
                break
            left -= len(block)
            yield block


class _BlockReader(io.RawIOBase):
    """A read-only, forward-only file over an iterator of blocks."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            block = next(self._blocks, None)
            if block is None:
                return 0
            self._pending = block
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def open_bundle_stream(store: BundleStore, sha256: str, size: int) -> io.BufferedReader:
    """The stored bundle as a forward-only binary file (``tarfile.open(fileobj=..., "r|*")``)."""
    return io.BufferedReader(_BlockReader(store.read(sha256, 0, size)), buffer_size=READ_BLOCK)
