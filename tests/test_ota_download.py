"""agent.ota.download against a real HTTP server on loopback (tests/range_server.py)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.ota.download import DownloadError, download
from common.backoff import Backoff
from tests.range_server import RangeServerState, range_server

SIZE = 300_000


@pytest.fixture
def body() -> bytes:
    return random.Random(5).randbytes(SIZE)


def _fast() -> Backoff:
    return Backoff(0.01, 0.02, jitter=0)


def _fetch(state: RangeServerState, dest: Path, body: bytes, **options: Any) -> Path:
    """Download ``body`` (checked against its SHA-256 and size) from a server in ``state``."""
    with range_server(state) as url:
        return download(
            url, dest, sha256=hashlib.sha256(body).hexdigest(), size=len(body), **options
        )


def _failure(state: RangeServerState, dest: Path, **options: Any) -> str:
    """Why a download from a server in ``state`` fails (expecting SIZE bytes of SHA-256
    0...0 unless ``options`` say otherwise)."""
    with range_server(state) as url, pytest.raises(DownloadError) as info:
        download(url, dest, **{"sha256": "0" * 64, "size": SIZE, **options})
    return info.value.reason


def test_download_writes_verified_file_and_leaves_no_part(tmp_path: Path, body: bytes) -> None:
    state = RangeServerState(body=body)
    progress: list[tuple[int, int]] = []
    dest = _fetch(
        state,
        tmp_path / "b.efb",
        body,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert dest.read_bytes() == body
    assert not (tmp_path / "b.efb.part").exists()
    assert progress[-1] == (SIZE, SIZE)
    assert state.ranges == [None]


def test_cut_connection_resumes_from_the_byte_reached(tmp_path: Path, body: bytes) -> None:
    state = RangeServerState(body=body, cut_after=[100_000, 50_000])
    dest = _fetch(state, tmp_path / "b.efb", body, backoff=_fast())
    assert dest.read_bytes() == body
    assert state.ranges[0] is None
    resumed = [int(r.split("=")[1].rstrip("-")) for r in state.ranges[1:] if r]
    assert len(resumed) == 2 and resumed[0] > 0 and resumed[1] > resumed[0]
    assert state.bytes_served < 2 * SIZE


def test_existing_part_is_resumed_and_rehashed(tmp_path: Path, body: bytes) -> None:
    (tmp_path / "b.efb.part").write_bytes(body[:123_456])
    state = RangeServerState(body=body)
    _fetch(state, tmp_path / "b.efb", body)
    assert state.ranges == ["bytes=123456-"]
    assert state.bytes_served == SIZE - 123_456
    assert (tmp_path / "b.efb").read_bytes() == body


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, body: bytes) -> None:
    (tmp_path / "b.efb.part").write_bytes(body[:1000])
    state = RangeServerState(body=body, ignore_range=True)
    _fetch(state, tmp_path / "b.efb", body)
    assert state.ranges == ["bytes=1000-"]
    assert (tmp_path / "b.efb").read_bytes() == body


def test_tampered_content_is_sha256_mismatch_and_nothing_kept(tmp_path: Path, body: bytes) -> None:
    tampered = bytearray(body)
    tampered[1234] ^= 0xFF
    state = RangeServerState(body=bytes(tampered))
    reason = _failure(state, tmp_path / "b.efb", sha256=hashlib.sha256(body).hexdigest())
    assert reason == "sha256_mismatch"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("send_length", [True, False])
@pytest.mark.parametrize("delta", [-10, 10])
def test_file_of_another_size_is_size_mismatch(
    tmp_path: Path, body: bytes, send_length: bool, delta: int
) -> None:
    """Caught from Content-Length when sent, else while streaming / at the end."""
    state = RangeServerState(body=body, send_length=send_length)
    reason = _failure(state, tmp_path / "b.efb", size=SIZE + delta, retries=1, backoff=_fast())
    assert reason == "size_mismatch"
    assert os.listdir(tmp_path) == []


def test_http_404_fails_at_once_without_retries(tmp_path: Path, body: bytes) -> None:
    state = RangeServerState(body=body, status=404)
    assert _failure(state, tmp_path / "b.efb", backoff=_fast()) == "http_404"
    assert state.requests == 1


def test_server_errors_are_retried_then_give_up(tmp_path: Path, body: bytes) -> None:
    state = RangeServerState(body=body, status=503)
    assert _failure(state, tmp_path / "b.efb", retries=2, backoff=_fast()) == "download_failed"
    assert state.requests == 3


def test_stop_event_cancels_promptly_and_keeps_part(tmp_path: Path, body: bytes) -> None:
    stall = threading.Event()
    state = RangeServerState(body=body, stall=stall, stall_after=8192)
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        stop.set()

    reason = _failure(state, tmp_path / "b.efb", chunk=4096, on_progress=progress, stop=stop)
    assert reason == "cancelled"
    assert not (tmp_path / "b.efb").exists()
    assert (tmp_path / "b.efb.part").stat().st_size < SIZE


def test_stop_event_cancels_a_backoff_wait(tmp_path: Path, body: bytes) -> None:
    state = RangeServerState(body=body, status=503)
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    reason = _failure(state, tmp_path / "b.efb", backoff=Backoff(60, 60, jitter=0), stop=stop)
    timer.cancel()
    assert reason == "cancelled"


def test_retries_count_only_attempts_without_progress(tmp_path: Path, body: bytes) -> None:
    state = RangeServerState(body=body, cut_after=[40_000, 40_000, 40_000, 40_000])
    _fetch(state, tmp_path / "b.efb", body, retries=1, backoff=_fast())
    assert state.requests == 5
    assert (tmp_path / "b.efb").read_bytes() == body


def test_stop_during_a_stalled_read_cancels_within_the_read_timeout(
    tmp_path: Path, body: bytes
) -> None:
    stall = threading.Event()
    state = RangeServerState(body=body, stall=stall, stall_after=0)
    stop = threading.Event()
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    reason = _failure(state, tmp_path / "b.efb", timeout_s=0.5, stop=stop)
    timer.cancel()
    assert reason == "cancelled"
