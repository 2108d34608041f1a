"""Per-process settings of the daemon (and of the benchmarks that measure it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas", "tune_process"]

log = logging.getLogger(__name__)

MALLOC_ARENAS = 2
"""glibc malloc arenas for the whole process (glibc's default: 8 per core)."""
_M_ARENA_MAX = -8
"""``mallopt`` parameter number of ``M_ARENA_MAX`` (glibc's malloc.h)."""


def tune_process() -> None:
    """Per-process settings for the daemon: one core for inference, the others for capture;
    few malloc arenas.

    OpenCV's own thread pool would compete with the inference thread for the same cores
    (measured: the detector's invoke() got 1.5-2x slower); each capture thread already
    runs on its own core.
    """
    import cv2

    cv2.setNumThreads(1)
    limit_malloc_arenas()


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (like ``MALLOC_ARENA_MAX``); True when applied.

    Every thread that allocates gets an arena of its own up to 8 per core, each keeping freed
    memory; the daemon's capture, inference and publishing threads allocate little and often,
    so a few arenas shared by all cost nothing measurable in speed and about 5 MB of RSS with
    4 streams (bench/cameras.py). Threads started afterwards are affected; no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl has no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_ARENA_MAX, arenas))
    if not applied:
        log.debug("mallopt(M_ARENA_MAX, %d) was refused", arenas)
    return applied
