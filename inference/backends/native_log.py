"""Keep a runtime's native start-up chatter off stderr.

LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` from C++ on every
interpreter it builds; neither TF_CPP_MIN_LOG_LEVEL nor an interpreter option silences it
(ai-edge-litert 2.3). :func:`quiet_native_stderr` points file descriptor 2 at a temporary
file around the native call, then restores it and writes back everything captured except
the known noise lines, so an error the runtime prints, or a line another thread logs
meanwhile, still reaches stderr (a little later).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["NOISE_PREFIXES", "quiet_native_stderr"]

NOISE_PREFIXES: tuple[bytes, ...] = (b"INFO: Created TensorFlow Lite XNNPACK delegate",)
"""Lines dropped from what native code printed while redirected."""

_LOCK = threading.Lock()
"""One redirection at a time: fd 2 is process-wide."""


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Drop :data:`NOISE_PREFIXES` lines printed to fd 2 inside the block; keep the rest."""
    with _LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 (a daemon with stderr closed): nothing to quiet
            yield
            return
        try:
            with tempfile.TemporaryFile() as capture:
                _flush_stderr()
                os.dup2(capture.fileno(), 2)
                try:
                    yield
                finally:
                    _flush_stderr()
                    os.dup2(saved, 2)
                    capture.seek(0)
                    _replay(capture.read(), saved)
        finally:
            os.close(saved)


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


def _replay(data: bytes, fd: int) -> None:
    kept = b"".join(
        line for line in data.splitlines(keepends=True) if not line.startswith(NOISE_PREFIXES)
    )
    view = memoryview(kept)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]
