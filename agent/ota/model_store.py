"""On-disk model store: per stream a ``current`` and a ``previous`` installed bundle.

Layout under ``root``::

    {stream}/state.json              {"schema": 1, "current": "slot-…", "previous": "slot-…"|null}
    {stream}/slot-{ref}-{token}/     an installed bundle: manifest.json (+ .sig) and its files
    {stream}/staging-{ref}/          installed but not yet activated

``current`` None means the stream runs its baseline (the model in the agent's config); a
``previous`` None means the model before was the baseline.

``state.json`` is the only pointer and is replaced atomically (temp file + fsync + rename),
so a crash at any step leaves ``current`` on a complete directory that was verified when it
was installed. Directories that ``state.json`` does not reference (interrupted installs,
slots renamed but never recorded, a previous slot not yet deleted) are removed on open.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from agent.atomic import atomic_write_json, read_json_state
from agent.ota import OtaError
from common.atomic import fsync_dir
from protocol import Manifest, ProtocolError, decode_manifest

__all__ = ["ModelStore", "StoreError", "verify_installed"]

log = logging.getLogger(__name__)

STATE_SCHEMA = 1
STATE_FILE = "state.json"
_STREAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")

FaultHook = Callable[[str], None]
"""Called with a step name (``copied``, ``staged``, ``renamed``, ``state_written``,
``cleaned``); tests raise from it to simulate a crash at that step."""


class StoreError(OtaError):
    """The model store cannot install, activate or roll back (see ``reason``)."""


def verify_installed(folder: Path) -> Manifest:
    """Check that ``folder`` holds a complete bundle (manifest + every file's size and sha256)."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = decode_manifest(manifest_path.read_bytes())
    except (OSError, ProtocolError) as err:
        raise StoreError(
            "install_invalid",
            f"{folder} is not an installed bundle ({err}); install the bundle again",
        ) from err
    for entry in manifest.files:
        path = folder.joinpath(*entry.path.split("/"))
        digest = hashlib.sha256()
        size = 0
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
        except OSError as err:
            raise StoreError(
                "install_invalid", f"{folder}: cannot read {entry.path} ({err}); reinstall"
            ) from err
        if size != entry.size or digest.hexdigest() != entry.sha256.lower():
            raise StoreError(
                "install_invalid",
                f"{folder}: {entry.path} does not match its manifest; reinstall the bundle",
            )
    return manifest


class ModelStore:
    """Installed model bundles per stream with atomic activate and rollback."""

    def __init__(self, root: Path, *, fault: FaultHook | None = None) -> None:
        self.root = Path(root)
        self._fault = fault if fault is not None else _no_fault
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and _STREAM.fullmatch(folder.name):
                self._clean(folder.name)

    # -- queries -------------------------------------------------------------------------

    def streams(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if (p / STATE_FILE).exists() and p.is_dir()
        )

    def current(self, stream: str) -> Path | None:
        """manifest.json of the active bundle of ``stream``, or None."""
        return self._manifest(stream, "current")

    def previous(self, stream: str) -> Path | None:
        """manifest.json of the bundle that was active before, or None."""
        return self._manifest(stream, "previous")

    def slots(self, stream: str) -> tuple[str | None, str | None]:
        """Names of the (current, previous) slot folders; None = baseline / nothing."""
        state = self._state(stream)
        return state.get("current"), state.get("previous")

    # -- changes -------------------------------------------------------------------------

    def install(self, stream: str, bundle_dir: Path, *, move: bool = False) -> Path:
        """Verify ``bundle_dir`` and stage it as ``{root}/{stream}/staging-{ref}``; return it.

        ``move`` renames ``bundle_dir`` instead of copying it (same file system only).
        """
        folder = self._stream_dir(stream)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = verify_installed(Path(bundle_dir))
        staged = folder / f"staging-{_safe(manifest.ref)}"
        tmp = folder / f".staging-{secrets.token_hex(4)}.tmp"
        try:
            if move:
                os.rename(bundle_dir, tmp)
            else:
                shutil.copytree(bundle_dir, tmp, symlinks=False)
            _fsync_tree(tmp)
            self._fault("copied")
            if staged.exists():
                shutil.rmtree(staged)
            os.rename(tmp, staged)
            fsync_dir(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._fault("staged")
        log.info("staged %s for stream %s at %s", manifest.ref, stream, staged)
        return staged

    def activate(self, stream: str, staged: Path) -> Path:
        """Make ``staged`` current and the current one previous; return the new manifest path."""
        folder = self._stream_dir(stream)
        staged = Path(staged)
        if staged.parent != folder or not staged.name.startswith("staging-"):
            raise StoreError(
                "not_staged", f"{staged} is not staged for stream {stream}: call install() first"
            )
        manifest = verify_installed(staged)
        state = self._state(stream)
        slot = folder / f"slot-{_safe(manifest.ref)}-{secrets.token_hex(4)}"
        os.rename(staged, slot)
        fsync_dir(folder)
        self._fault("renamed")
        old_previous = state.get("previous")
        self._write(stream, current=slot.name, previous=state.get("current"))
        self._fault("state_written")
        if old_previous:
            shutil.rmtree(folder / old_previous, ignore_errors=True)
            fsync_dir(folder)
        self._fault("cleaned")
        log.info("stream %s: activated %s", stream, manifest.ref)
        return slot / "manifest.json"

    def rollback(self, stream: str) -> Path:
        """Swap current and previous; return the (new) current manifest path."""
        state = self._state(stream)
        if not state.get("previous"):
            raise StoreError(
                "no_previous",
                f"stream {stream} has no previous model to roll back to",
            )
        self._write(stream, current=state["previous"], previous=state.get("current"))
        self._fault("state_written")
        path = self.current(stream)
        assert path is not None
        log.warning("stream %s: rolled back to %s", stream, path.parent.name)
        return path

    def revert(self, stream: str) -> Path | None:
        """Swap current and previous, where None is the baseline; return the new current.

        Unlike :meth:`rollback` this also goes back to the baseline (previous None) and from
        it (current None). Raises StoreError ``no_previous`` when both are None.
        """
        state = self._state(stream)
        if not state.get("previous") and not state.get("current"):
            raise StoreError(
                "no_previous", f"stream {stream} has no installed model to switch back to"
            )
        self._write(stream, current=state.get("previous"), previous=state.get("current"))
        self._fault("state_written")
        path = self.current(stream)
        log.warning(
            "stream %s: reverted to %s", stream, path.parent.name if path else "the baseline"
        )
        return path

    def deactivate(self, stream: str) -> None:
        """Go back to the baseline: current None, previous = the current one (old previous
        deleted). A no-op when the baseline is already current."""
        folder = self._stream_dir(stream)
        state = self._state(stream)
        if not state.get("current"):
            return
        old_previous = state.get("previous")
        self._write(stream, current=None, previous=state.get("current"))
        self._fault("state_written")
        if old_previous:
            shutil.rmtree(folder / old_previous, ignore_errors=True)
            fsync_dir(folder)
        log.info("stream %s: back to the baseline model", stream)

    def discard(self, stream: str, staged: Path) -> None:
        """Remove a staged (never activated) install."""
        folder = self._stream_dir(stream)
        staged = Path(staged)
        if staged.parent == folder and staged.name.startswith("staging-") and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
            fsync_dir(folder)

    # -- internals -----------------------------------------------------------------------

    def _stream_dir(self, stream: str) -> Path:
        if not _STREAM.fullmatch(stream):
            raise StoreError(
                "bad_stream", f"invalid stream name {stream!r}: use letters, digits, . _ -"
            )
        return self.root / stream

    def _state(self, stream: str) -> dict[str, str | None]:
        path = self._stream_dir(stream) / STATE_FILE
        raw = read_json_state(
            path,
            schema=STATE_SCHEMA,
            what="model store state",
            fix=f"delete {path.parent} and let the controller reinstall the model",
        )
        if raw is None:
            return {"current": None, "previous": None}
        return {
            "current": _str_or_none(raw.get("current")),
            "previous": _str_or_none(raw.get("previous")),
        }

    def _write(self, stream: str, *, current: str | None, previous: str | None) -> None:
        atomic_write_json(
            self._stream_dir(stream) / STATE_FILE,
            schema=STATE_SCHEMA,
            data={"current": current, "previous": previous},
        )

    def _manifest(self, stream: str, slot: str) -> Path | None:
        name = self._state(stream).get(slot)
        if not name:
            return None
        path = self._stream_dir(stream) / name / "manifest.json"
        return path if path.is_file() else None

    def _clean(self, stream: str) -> None:
        folder = self._stream_dir(stream)
        state = self._state(stream)
        keep = {STATE_FILE, *(v for v in state.values() if v)}
        for entry in folder.iterdir():
            if entry.name in keep:
                continue
            log.info("model store: removing leftover %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        fsync_dir(folder)


def _no_fault(step: str) -> None:
    pass


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "/" in value or value in {"", ".", ".."}:
        raise StoreError("state_corrupt", f"model store state has a bad slot name {value!r}")
    return value


def _safe(ref: str) -> str:
    return _UNSAFE.sub("_", ref)


def _fsync_tree(top: Path) -> None:
    for dirpath, _dirs, filenames in os.walk(top):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
