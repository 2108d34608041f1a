"""kill -9 in the middle of the publisher's work loses nothing appended (both spool kinds).

A child process appends bursts, acknowledges all but the newest records and syncs as often
as the interval allows, reporting each step on stdout; the parent kills it with SIGKILL at an
arbitrary moment, reopens the spool and checks what survived against the reports: every
record whose append returned is there, nothing beyond the last ack the child issued is gone,
and what is left is one gap-free run in order (forgotten acks only bring back a prefix).
Three kills in a row on the same folder, each child going on from what the last one left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.spool.queue import Spool
from bench.spool_sqlite import SqliteSpool

REPO = Path(__file__).resolve().parent.parent
KEEP = 100
"""The child never acknowledges its newest KEEP records (the in-flight window)."""
BURST = 16

_CHILD = f"""
import importlib, sys
from pathlib import Path
cls = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])
spool = cls(Path(sys.argv[1]), max_bytes=1 << 30, sync_interval_s=0.005)
nxt = int(sys.argv[4])
first = nxt - spool.depth  # number of the oldest pending record
pad = b" " + b"x" * 300
out = sys.stdout
step = 0
while True:
    n = 1 + step % {BURST}
    step += 1
    spool.append_many(
        [("edgefleet/v1/dev-1/detections/cam0", b"%d" % (nxt + k) + pad, 1) for k in range(n)]
    )
    nxt += n
    out.write("appended %d\\n" % nxt)
    k = spool.depth - {KEEP}
    if k > 0:
        out.write("ack %d\\n" % (first + k))
        out.flush()
        spool.ack(k)
        first += k
    out.flush()
    spool.sync_if_due()
"""

IMPLS: dict[str, type[Spool] | type[SqliteSpool]] = {"segments": Spool, "sqlite": SqliteSpool}


def _numbers(spool: Spool | SqliteSpool) -> list[int]:
    return [int(r.payload.split(b" ", 1)[0]) for r in spool.peek(spool.depth + 1)]


def _kill_child(
    directory: Path, cls: type[Spool] | type[SqliteSpool], start: int, first: int, after: int
) -> tuple[int, int]:
    """Run the child from record ``start`` (``first`` is the oldest pending one) and SIGKILL
    it once it reported ``after`` more appends. Returns (records whose append returned,
    the highest ack boundary it issued: every record below may be gone, none above)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(directory), cls.__module__, cls.__name__, str(start)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    appended, acked = start, first

    def take(line: bytes) -> None:
        nonlocal appended, acked
        kind, value = line.split()
        if kind == b"appended":
            appended = int(value)
        else:
            acked = int(value)

    try:
        for line in proc.stdout:
            take(line)
            if appended >= start + after:
                break
        proc.send_signal(signal.SIGKILL)  # wherever it is: mid-append, mid-ack, mid-sync
        assert proc.wait(timeout=60) == -signal.SIGKILL
        for line in proc.stdout.read().splitlines():  # written before it died
            take(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return appended, acked


@pytest.mark.parametrize("kind", sorted(IMPLS))
def test_kill_9_mid_stream_loses_nothing_appended(tmp_path: Path, kind: str) -> None:
    cls = IMPLS[kind]
    start = first = 0
    for after in (700, 3000, 9000):
        appended, acked = _kill_child(tmp_path, cls, start, first, after)
        assert appended >= start + after
        with cls(tmp_path, max_bytes=1 << 30) as spool:
            got = _numbers(spool)
            assert got, "the child never acks its newest records: some must be pending"
            assert got == list(range(got[0], got[-1] + 1))  # in order, no gap, no duplicate
            assert got[-1] + 1 >= appended  # every append that returned survived
            assert got[-1] + 1 <= appended + BURST  # at most the burst cut by the kill
            assert first <= got[0] <= acked  # synced acks stay, unacked records stay
            indexes = [r.index for r in spool.peek(spool.depth)]
            assert indexes == sorted(set(indexes))
            start, first = got[-1] + 1, got[0]
