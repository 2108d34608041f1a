"""The persistent detection sequence number and the atomic state-file helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.atomic import StateFileError, atomic_write_json, read_json_state
from agent.errors import AgentError
from agent.sequence import SequenceCounter
from common.atomic import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent


def test_sequence_starts_at_one_and_increases_by_one(tmp_path: Path) -> None:
    counter = SequenceCounter(tmp_path / "seq.json", block=10)
    assert [counter.next() for _ in range(25)] == list(range(1, 26))


def test_sequence_restart_continues_above_every_number_handed_out(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    first = SequenceCounter(path, block=10)
    used = [first.next() for _ in range(25)]
    second = SequenceCounter(path, block=10)
    after = [second.next() for _ in range(5)]
    assert after[0] > max(used)
    assert after == sorted(after)
    assert after[0] == 31  # the lease taken at 21 ran to 31: the rest of that block is a gap


def test_sequence_persists_once_per_block_not_per_number(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    counter = SequenceCounter(path, block=100)
    counter.next()
    inode = os.stat(path).st_ino  # every atomic write replaces the file (new inode)
    for _ in range(99):
        counter.next()
    assert os.stat(path).st_ino == inode
    counter.next()  # number 101 needs a new lease
    assert os.stat(path).st_ino != inode
    assert json.loads(path.read_text()) == {"schema": 1, "lease_end": 201}


def test_sequence_never_repeats_after_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from agent.sequence import SequenceCounter\n"
        "c = SequenceCounter(Path(sys.argv[1]), block=50)\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    print(c.next(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    seen: list[int] = []
    for run in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(path), str(37 + run * 20)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == -9, proc.stderr
        numbers = [int(line) for line in proc.stdout.split()]
        assert numbers, proc.stderr
        if seen:
            assert numbers[0] > seen[-1]
        seen.extend(numbers)
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)


def test_sequence_is_thread_safe(tmp_path: Path) -> None:
    counter = SequenceCounter(tmp_path / "seq.json", block=64)
    results: list[list[int]] = [[] for _ in range(4)]

    def take(out: list[int]) -> None:
        for _ in range(2000):
            out.append(counter.next())

    threads = [threading.Thread(target=take, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = sorted(n for r in results for n in r)
    assert merged == list(range(1, 8001))
    for r in results:
        assert r == sorted(r)


def test_sequence_corrupt_file_says_which_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    path.write_bytes(b"\x00\x00garbage")
    with pytest.raises(StateFileError) as info:
        SequenceCounter(path)
    message = str(info.value)
    assert str(path) in message
    assert "corrupt" in message
    assert "delete it only if" in message
    assert isinstance(info.value, AgentError)


def test_sequence_unknown_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    path.write_text('{"schema": 2, "lease_end": 5}')
    with pytest.raises(StateFileError, match="schema 2"):
        SequenceCounter(path)


def test_sequence_bad_lease_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    path.write_text('{"schema": 1, "lease_end": "soon"}')
    with pytest.raises(StateFileError, match="lease_end"):
        SequenceCounter(path)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    atomic_write_bytes(path, b"first version, longer than the second")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_atomic_json_round_trip_carries_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert read_json_state(path, schema=3, what="test state", fix="fix it") is None
    atomic_write_json(path, schema=3, data={"a": 1})
    assert read_json_state(path, schema=3, what="test state", fix="fix it") == {"schema": 3, "a": 1}
    with pytest.raises(StateFileError, match="fix it"):
        read_json_state(path, schema=4, what="test state", fix="fix it")


def test_sequence_close_lets_a_clean_restart_continue_without_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    first = SequenceCounter(path, block=1000)
    assert [first.next() for _ in range(5)] == [1, 2, 3, 4, 5]
    first.close()
    assert SequenceCounter(path, block=1000).peek() == 6


def test_sequence_number_taken_after_close_is_never_repeated_by_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "seq.json"
    first = SequenceCounter(path, block=1000)
    first.next()
    first.close()
    late = first.next()  # e.g. a last frame published while shutting down
    assert late == 2
    assert SequenceCounter(path, block=1000).next() > late
