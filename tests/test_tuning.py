"""The daemon's per-process settings (agent.tuning): few malloc arenas, one OpenCV thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agent.tuning import MALLOC_ARENAS

# Eight threads alive at once each allocate from malloc (100 kB blocks: above pymalloc's
# limit, below the mmap threshold); every arena but the main one is a 64 MiB-aligned heap
# mapping (read-write, then reserved ---p, 64 MiB together) in /proc/self/maps.
PROBE = textwrap.dedent(
    """
    import sys, threading
    from agent.tuning import limit_malloc_arenas, tune_process
    if sys.argv[1] == "tune":
        tune_process()
    keep = []
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        keep.append([bytearray(100_000) for _ in range(5)])
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    rows = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        rows.append((start, end, fields[1], len(fields) > 5))
    heaps = 0
    for i, (start, end, perm, named) in enumerate(rows):
        if start % (64 << 20) or named or not perm.startswith("rw"):
            continue
        j = i + 1
        while j < len(rows) and rows[j][0] == end and rows[j][2] == "---p" and not rows[j][3]:
            end = rows[j][1]
            j += 1
        heaps += end - start == 64 << 20
    print(heaps)
    """
)


def _arenas(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout) + 1  # the main arena is not a heap mapping


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas")
def test_the_daemon_caps_malloc_arenas_that_threads_would_otherwise_multiply() -> None:
    untuned = _arenas("plain")
    assert untuned > MALLOC_ARENAS, "the probe's threads no longer get arenas of their own"
    assert _arenas("tune") == MALLOC_ARENAS
