"""The on-disk spool: order, acks, drop-oldest, torn records, restarts (real files, real kill -9).

The contract tests run against both implementations (the ``impl`` fixture): the agent's
segment spool and the experimental SQLite one (``bench.spool_sqlite``). Tests of the segment
file format stay segment-only; the SQLite file has its own tests at the end.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.atomic import StateFileError
from agent.spool import SpoolError
from agent.spool.queue import Spool
from agent.spool.records import encode_record
from agent.spool.recovery import STATE_FILE
from agent.spool.segments import HEADER
from bench.spool_sqlite import DB_FILE, SqliteSpool

REPO = Path(__file__).resolve().parent.parent
TOPIC = "edgefleet/v1/dev1/detections/cam"

AnySpool = Spool | SqliteSpool
Impl = type[Spool] | type[SqliteSpool]
IMPLS: dict[str, Impl] = {"segments": Spool, "sqlite": SqliteSpool}


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> Impl:
    """The spool class under test: each contract test runs against both implementations."""
    return IMPLS[request.param]


def payload(i: int) -> bytes:
    return b'{"seq": %d}' % i


def fixed_payload(i: int) -> bytes:
    return b'{"seq": %06d}' % i  # every record the same size


def contents(spool: AnySpool) -> list[bytes]:
    return [r.payload for r in spool.peek(spool.depth + 1)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg*.log"))


def stored_head(directory: Path) -> int:
    """The head index an SQLite spool committed (read by a second connection)."""
    db = sqlite3.connect(directory / DB_FILE)
    try:
        return int(db.execute("SELECT head FROM meta").fetchone()[0])
    finally:
        db.close()


def test_spool_keeps_order_topic_and_qos_across_restart(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as spool:
        for i in range(300):
            spool.append(f"t/{i % 3}", payload(i), qos=i % 2)
        assert spool.depth == 300
    if impl is Spool:
        assert len(segments(tmp_path)) > 1  # the test crosses segment boundaries
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as again:
        records = again.peek(1000)
        assert [(r.topic, r.payload, r.qos) for r in records] == [
            (f"t/{i % 3}", payload(i), i % 2) for i in range(300)
        ]
        assert [r.index for r in records] == sorted(r.index for r in records)


def test_spool_peek_skip_reads_past_records_in_flight(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as spool:
        spool.append_many([(TOPIC, payload(i), 1) for i in range(200)])
        got = spool.peek(5, skip=150)
        assert [r.payload for r in got] == [payload(i) for i in range(150, 155)]
        assert spool.peek(10, skip=198) == spool.peek(2, skip=198)
        assert spool.peek(10, skip=200) == []


def test_spool_ack_persists_across_restart(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as spool:
        spool.append_many([(TOPIC, payload(i), 1) for i in range(100)])
        spool.ack(37)
        assert spool.depth == 63
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as again:
        assert contents(again) == [payload(i) for i in range(37, 100)]
        again.ack(63)
        assert again.depth == 0
        assert again.size_bytes == 0
    with impl(tmp_path, max_bytes=1 << 20) as empty:
        assert empty.depth == 0
        empty.append(TOPIC, b"new")
        assert contents(empty) == [b"new"]


def test_spool_deletes_segments_once_consumed(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as spool:
        spool.append_many([(TOPIC, payload(i), 1) for i in range(400)])
        before = len(segments(tmp_path))
        assert before > 3
        spool.ack(200)
        assert 0 < len(segments(tmp_path)) < before
        spool.ack(200)
        assert segments(tmp_path) == []


def test_spool_ack_more_than_pending_is_refused(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(TOPIC, b"x")
        with pytest.raises(ValueError, match="1 pending"):
            spool.ack(2)


def test_spool_drops_oldest_when_full_with_exact_count(tmp_path: Path, impl: Impl) -> None:
    size = len(encode_record(TOPIC, fixed_payload(0), 1))
    with impl(tmp_path, max_bytes=10 * size, segment_bytes=4 * size) as spool:
        for i in range(25):
            spool.append(TOPIC, fixed_payload(i))
        assert spool.depth == 10
        assert spool.dropped == 15
        assert spool.size_bytes == 10 * size
        assert contents(spool) == [fixed_payload(i) for i in range(15, 25)]
    with impl(tmp_path, max_bytes=10 * size, segment_bytes=4 * size) as again:
        assert again.dropped == 15
        assert contents(again) == [fixed_payload(i) for i in range(15, 25)]
        again.append(TOPIC, fixed_payload(25))
        assert again.dropped == 16
        assert contents(again)[0] == fixed_payload(16)


def test_spool_drops_a_record_larger_than_the_whole_spool(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=4096) as spool:
        spool.append(TOPIC, b"small")
        spool.append(TOPIC, b"x" * 5000)
        assert contents(spool) == [b"small"]
        assert spool.dropped == 1


def test_spool_ack_through_stays_correct_after_drops(tmp_path: Path, impl: Impl) -> None:
    size = len(encode_record(TOPIC, fixed_payload(0), 1))
    with impl(tmp_path, max_bytes=5 * size) as spool:
        for i in range(5):
            spool.append(TOPIC, fixed_payload(i))
        in_flight = spool.peek(3)  # handed to the broker
        for i in range(5, 7):
            spool.append(TOPIC, fixed_payload(i))  # drops records 0 and 1
        assert spool.dropped == 2
        assert spool.ack_through(in_flight[-1].index) == 1  # only record 2 was still pending
        assert contents(spool) == [fixed_payload(i) for i in range(3, 7)]


def test_spool_ignores_torn_tail_record_and_keeps_appending(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        for i in range(5):
            spool.append(TOPIC, payload(i))
    (seg,) = segments(tmp_path)
    data = seg.read_bytes()
    seg.write_bytes(data[:-3])  # power loss in the middle of the last record
    with Spool(tmp_path, max_bytes=1 << 20) as again:
        assert contents(again) == [payload(i) for i in range(4)]
        again.append(TOPIC, payload(99))
    with Spool(tmp_path, max_bytes=1 << 20) as third:
        assert contents(third) == [*(payload(i) for i in range(4)), payload(99)]


def test_spool_skips_record_with_bad_crc(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        for i in range(3):
            spool.append(TOPIC, payload(i))
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-2] ^= 0xFF  # flip a bit inside the last payload
    seg.write_bytes(bytes(data))
    with Spool(tmp_path, max_bytes=1 << 20) as again:
        assert contents(again) == [payload(0), payload(1)]


def test_spool_removes_segment_cut_before_its_header(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(TOPIC, payload(0))
    (tmp_path / "seg+00000000000000000099.log").write_bytes(HEADER[:3])
    with Spool(tmp_path, max_bytes=1 << 20) as again:
        assert contents(again) == [payload(0)]
    assert len(segments(tmp_path)) == 1


def test_spool_refuses_a_foreign_segment_file(tmp_path: Path) -> None:
    (tmp_path / "seg+00000000000000000001.log").write_bytes(b"NOTASPOOL" + b"\x00" * 20)
    with pytest.raises(SpoolError, match="not an edgefleet spool segment"):
        Spool(tmp_path, max_bytes=1 << 20)


def test_spool_refuses_unknown_state_schema(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"schema": 9, "head_segment": 1}))
    with pytest.raises(StateFileError, match="delete it"):
        Spool(tmp_path, max_bytes=1 << 20)


def test_spool_prepend_puts_records_in_front_durably(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as spool:
        spool.append_many([(TOPIC, payload(i), 1) for i in range(10, 20)])
        spool.ack(2)  # the head segment has a consumed prefix
        spool.prepend([(TOPIC, payload(i), 1) for i in range(5, 10)])
        assert contents(spool) == [payload(i) for i in range(5, 10)] + [
            payload(i) for i in range(12, 20)
        ]
        spool.append(TOPIC, payload(20))
    with impl(tmp_path, max_bytes=1 << 20, segment_bytes=4096) as again:
        assert contents(again) == [payload(i) for i in (*range(5, 10), *range(12, 21))]


def test_spool_prepend_into_empty_spool(tmp_path: Path, impl: Impl) -> None:
    with impl(tmp_path, max_bytes=1 << 20) as spool:
        spool.prepend([(TOPIC, payload(i), 1) for i in range(3)])
    with impl(tmp_path, max_bytes=1 << 20) as again:
        assert contents(again) == [payload(i) for i in range(3)]


def test_spool_survives_kill_9_without_sync(tmp_path: Path, impl: Impl) -> None:
    """A process crash loses nothing: every append is in the page cache when it returns."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        f"from {impl.__module__} import {impl.__name__} as Spool\n"
        "s = Spool(Path(sys.argv[1]), max_bytes=1 << 20, sync_interval_s=3600)\n"
        "for i in range(500):\n"
        "    s.append('t', b'%d' % i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, timeout=60, check=False
    )
    assert proc.returncode == -9
    with impl(tmp_path, max_bytes=1 << 20) as again:
        assert contents(again) == [b"%d" % i for i in range(500)]


def test_spool_sync_if_due_respects_the_interval(tmp_path: Path, impl: Impl) -> None:
    now = [0.0]
    with impl(tmp_path, max_bytes=1 << 20, sync_interval_s=1.0, clock=lambda: now[0]) as spool:
        spool.append(TOPIC, b"a")
        assert spool.sync_if_due() is False
        now[0] = 1.5
        assert spool.sync_if_due() is True
        assert spool.sync_if_due() is False  # nothing changed since
        spool.ack(1)
        now[0] = 3.0
        assert spool.sync_if_due() is True
        if impl is Spool:
            assert json.loads((tmp_path / STATE_FILE).read_text())["schema"] == 1
        else:
            assert stored_head(tmp_path) == 1  # the sync committed the ack


def test_spool_closed_refuses_use(tmp_path: Path, impl: Impl) -> None:
    spool = impl(tmp_path, max_bytes=1 << 20)
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        spool.append(TOPIC, b"x")


def test_spool_appends_while_another_thread_syncs(tmp_path: Path, impl: Impl) -> None:
    """The owner's sync (fsyncs, checkpoints) runs beside appends and acks, losing nothing."""
    with impl(tmp_path, max_bytes=1 << 30, sync_interval_s=0.0) as spool:
        done = threading.Event()
        errors: list[BaseException] = []

        def syncer() -> None:
            try:
                while not done.is_set():
                    spool.sync_if_due()
            except BaseException as err:
                errors.append(err)

        thread = threading.Thread(target=syncer)
        thread.start()
        try:
            for i in range(0, 3000, 10):
                spool.append_many([(TOPIC, payload(i + k), 1) for k in range(10)])
                if i % 100 == 0:
                    spool.ack(5)
        finally:
            done.set()
            thread.join()
        assert errors == []
        assert spool.depth == 3000 - 5 * 30
    with impl(tmp_path, max_bytes=1 << 30) as again:
        assert contents(again) == [payload(i) for i in range(150, 3000)]


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 40)),
        st.tuples(st.just("ack"), st.integers(0, 30)),
        st.tuples(st.just("prepend"), st.integers(1, 5)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("kind", sorted(IMPLS))
@settings(max_examples=60, deadline=None)
@given(_ops)
def test_spool_matches_a_bounded_fifo_model(kind: str, ops: list[tuple[str, int]]) -> None:
    size = len(encode_record(TOPIC, fixed_payload(0), 1))
    capacity = 30
    model: deque[bytes] = deque()
    dropped = 0
    counter = 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)

        def open_spool() -> AnySpool:
            return IMPLS[kind](directory, max_bytes=capacity * size, segment_bytes=7 * size)

        spool = open_spool()
        try:
            for op, n in ops:
                if op == "append":
                    items = [(TOPIC, fixed_payload(counter + i), 1) for i in range(n)]
                    counter += n
                    spool.append_many(items)
                    for _, p, _ in items:
                        if len(model) == capacity:
                            model.popleft()
                            dropped += 1
                        model.append(p)
                elif op == "ack":
                    k = min(n, len(model))
                    spool.ack(k)
                    for _ in range(k):
                        model.popleft()
                elif op == "prepend":
                    items = [(TOPIC, fixed_payload(900000 + counter + i), 1) for i in range(n)]
                    counter += n
                    spool.prepend(items)
                    fit = min(n, capacity - len(model))
                    dropped += n - fit
                    model.extendleft(reversed([p for _, p, _ in items][n - fit :]))
                else:
                    spool.close()
                    spool = open_spool()
                assert contents(spool) == list(model)
                assert spool.dropped == dropped
                assert spool.size_bytes == len(model) * size
        finally:
            spool.close()


# --- the SQLite spool's own file ----------------------------------------------------------


def test_sqlite_spool_refuses_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"NOTASPOOL" * 200)
    with pytest.raises(SpoolError, match="cannot open the spool database"):
        SqliteSpool(tmp_path, max_bytes=1 << 20)


def test_sqlite_spool_refuses_unknown_schema(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("PRAGMA user_version = 9")
    db.close()
    with pytest.raises(SpoolError, match="has schema 9"):
        SqliteSpool(tmp_path, max_bytes=1 << 20)


def test_sqlite_spool_fsyncs_only_in_sync_and_then_needs_no_wal(tmp_path: Path) -> None:
    """Appends stay in the WAL until ``sync`` checkpoints them into the database file:
    a copy of the database file alone (what an fsync made durable) has them only after."""
    live, before, after = tmp_path / "live", tmp_path / "before", tmp_path / "after"
    with SqliteSpool(live, max_bytes=1 << 20, sync_interval_s=3600) as spool:
        spool.append_many([(TOPIC, payload(i), 1) for i in range(50)])
        spool.ack(10)
        before.mkdir()
        shutil.copy(live / DB_FILE, before / DB_FILE)
        spool.sync()
        after.mkdir()
        shutil.copy(live / DB_FILE, after / DB_FILE)
    with SqliteSpool(before, max_bytes=1 << 20) as old:
        assert old.depth == 0
    with SqliteSpool(after, max_bytes=1 << 20) as synced:
        assert contents(synced) == [payload(i) for i in range(10, 50)]


def test_sqlite_spool_indexes_survive_reopen(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append_many([(TOPIC, payload(i), 1) for i in range(5)])
        spool.ack(2)
    with SqliteSpool(tmp_path, max_bytes=1 << 20) as again:
        assert again.head_index == 2
        again.append(TOPIC, payload(5))
        assert [r.index for r in again.peek(10)] == [2, 3, 4, 5]
        assert again.ack_through(3) == 2
    assert stored_head(tmp_path) == 4


def test_sqlite_spool_gives_the_disk_back_once_empty(tmp_path: Path) -> None:
    db, wal = tmp_path / DB_FILE, tmp_path / f"{DB_FILE}-wal"
    with SqliteSpool(tmp_path, max_bytes=1 << 30, sync_interval_s=3600) as spool:
        spool.append_many([(TOPIC, b"x" * 500, 1) for _ in range(10_000)])
        spool.sync()
        assert db.stat().st_size > 5_000_000
        assert wal.stat().st_size > 4 << 20
        spool.ack(9999)
        spool.sync()
        assert db.stat().st_size > 5_000_000  # one record still pending: no VACUUM yet
        spool.ack(1)
        spool.sync()
        assert db.stat().st_size < 100_000
        assert wal.stat().st_size <= 4 << 20
