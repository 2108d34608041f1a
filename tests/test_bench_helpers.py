"""The benchmarks' own helpers that decide what a report says: the whole machine's busy
time (bench.procstat) and which rows a baseline agent can run (bench.cameras)."""

from __future__ import annotations

import time
from pathlib import Path

from bench import procstat
from bench.cameras import _baseline_plans

STAT = """cpu  1000 20 300 5000 40 5 60 7 0 0
cpu0 500 10 150 2500 20 2 30 3 0 0
intr 12345
"""


def test_machine_busy_counts_everything_but_idle_and_iowait(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    busy, available = procstat.machine_busy_s(stat)
    ticks = procstat.CLOCK_TICKS
    assert busy == (1000 + 20 + 300 + 5 + 60 + 7) / ticks
    assert available == (1000 + 20 + 300 + 5000 + 40 + 5 + 60 + 7) / ticks


def test_machine_busy_moves_with_real_work() -> None:
    busy0, all0 = procstat.machine_busy_s()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 s of this process's CPU
        pass
    busy1, all1 = procstat.machine_busy_s()
    assert busy1 - busy0 >= 0.2
    assert 0 < busy1 - busy0 <= all1 - all0 + 0.02  # a saturated machine: equal


def test_a_baseline_without_motion_gating_runs_only_the_plain_row(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    assert _baseline_plans(tmp_path) == [(False, False)]
    (tmp_path / "agent" / "motion.py").write_text("")
    assert _baseline_plans(tmp_path) == [(False, False), (True, False)]


def test_a_process_counts_its_ended_children_when_asked() -> None:
    # pid (comm) state ppid ... utime=11th after comm (index 11), stime, cutime, cstime
    line = "42 (post gres) S 1 2 3 4 5 6 7 8 9 10 100 50 30 20 0 0 1 0"
    ticks = procstat.CLOCK_TICKS
    assert procstat.stat_cpu_s(line) == 150 / ticks
    assert procstat.stat_cpu_s(line, children=True) == 200 / ticks


def test_an_ended_child_counts_for_its_parent_from_the_first_snapshot_on() -> None:
    from bench.cluster import ProcCpu, cpu_split

    before = {
        10: ProcCpu("postgres", 5.0, 1),  # the postmaster
        11: ProcCpu("postgres", 2.0, 10),  # a backend that ends before the second snapshot
        20: ProcCpu("python", 1.0, 1),
    }
    after = {
        10: ProcCpu("postgres", 5.0 + 3.5, 1),  # reaped the backend: its 3.5 s in all
        20: ProcCpu("python", 4.0, 1),
        21: ProcCpu("mosquitto", 0.5, 20),  # started in between
    }
    split = cpu_split(before, after, {20: "simulator"})
    assert split == {"postgres": 1.5, "simulator": 3.0, "mosquitto": 0.5}
