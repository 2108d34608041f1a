"""Per-process settings of the daemon (and of the benchmarks that measure it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Iterable

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas", "name_os_threads", "tune_process"]

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


def name_os_threads(threads: Iterable[threading.Thread] | None = None) -> int:
    """Give the OS threads of this process (or of ``threads``) the names of their Python
    threads; returns how many were renamed.

    Linux knows them all as ``python3`` (Python < 3.14 does not name them): with their names
    in ``/proc/self/task/TID/comm`` (15 bytes), ``top -H``, ``ps -L -o tid,comm,pcpu`` and
    the CPU time in ``/proc/PID/task/TID/stat`` say which stream's inference, capture or the
    publisher uses the CPU (bench/cameras.py splits a camera's cost this way). The main thread
    keeps the process name. Cheap and idempotent: the daemon calls it at start and on every
    telemetry interval, for threads started later (a reconnecting camera). No-op off Linux.
    """
    if not sys.platform.startswith("linux"):
        return 0
    main = threading.main_thread()
    renamed = 0
    for thread in threading.enumerate() if threads is None else threads:
        tid = thread.native_id
        if thread is main or tid is None:
            continue
        name = thread.name.encode("utf-8", "replace")[:15]
        path = f"/proc/self/task/{tid}/comm"
        try:
            with open(path, "rb") as f:
                if f.read().rstrip(b"\n") == name:
                    continue
            with open(path, "wb") as f:
                f.write(name)
        except OSError:  # the thread ended meanwhile, or /proc is not mounted
            continue
        renamed += 1
    return renamed
