"""CPU time from ``/proc`` (Linux), for the benchmarks that split a run's CPU by process or
thread. No imports beyond the standard library: bench/cameras.py uses it without pulling
in the controller."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_s(stat: str) -> float:
    """utime + stime in seconds of a ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``)
    line."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_s(stat: Path) -> float:
    """utime + stime in seconds of a process or thread, from its ``stat`` file."""
    return stat_cpu_s(stat.read_text())
