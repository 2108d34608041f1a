"""The daemon's threads carry their names in the OS (``agent.tuning.name_os_threads``).

Python < 3.14 leaves every thread named ``python3`` in ``/proc``, so ``top -H`` and the
per-thread CPU times cannot say which stream's inference or capture, or the publisher, uses
the CPU; bench/cameras.py splits a camera's cost by these names.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.tuning import name_os_threads
from tests.agent_proc import VIDEO, start_agent, stop_agent, stream_block, write_config
from tests.broker import Mosquitto
from tests.waiting import wait_for


def _comm(pid: int | str, tid: int | str) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n")


def _names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(_comm(pid, tid))
        except OSError:
            continue
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")
def test_threads_get_their_python_names_and_the_main_thread_keeps_the_process_name() -> None:
    main_before = _comm("self", threading.get_native_id())
    release = threading.Event()
    started = threading.Barrier(3)

    def park() -> None:
        started.wait()
        release.wait(30)

    short = threading.Thread(target=park, name="infer-cam0")
    long = threading.Thread(target=park, name="source-a-very-long-camera-name")
    try:
        short.start()
        long.start()
        started.wait()
        name_os_threads()  # every thread of the process
        assert _comm("self", short.native_id or 0) == "infer-cam0"
        assert _comm("self", long.native_id or 0) == "source-a-very-l"  # 15 bytes: the limit
        assert _comm("self", threading.get_native_id()) == main_before
        ours = [short, long, threading.main_thread()]
        assert name_os_threads(ours) == 0  # named already; the main thread is never renamed
        late = threading.Thread(target=release.wait, args=(30,), name="late")
        late.start()
        wait_for(lambda: late.native_id is not None, timeout=5, what="the late thread")
        assert name_os_threads([*ours, late]) == 1
        assert _comm("self", late.native_id or 0) == "late"
    finally:
        release.set()
        for t in threading.enumerate():
            if t.name in ("infer-cam0", "source-a-very-long-camera-name", "late"):
                t.join(5)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")
def test_the_daemons_threads_are_named_by_stream_and_role(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    streams = stream_block("front", source=str(VIDEO)) + stream_block("back", source=str(VIDEO))
    config = write_config(tmp_path, port=mosquitto.port, streams=streams)
    log = tmp_path / "agent.log"
    proc = start_agent(config, log)
    expected = {
        "infer-front",
        "source-front",
        "infer-back",
        "source-back",
        "mqtt-publisher",
        "telemetry",
        "paho-mqtt-clien",  # paho's network thread, cut at 15 bytes
    }
    try:
        names: list[str] = wait_for(
            lambda: n if expected <= set(n := _names(proc.pid)) else None,
            timeout=60,
            what=f"the daemon's named threads ({sorted(expected)})",
        )
        assert "MainThread" not in names  # the process keeps its own name
        assert _comm(proc.pid, proc.pid) == Path(f"/proc/{proc.pid}/comm").read_text().strip()
    finally:
        code, _ = stop_agent(proc)
    assert code == 0, log.read_text(errors="replace")[-3000:]
