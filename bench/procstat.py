"""CPU time from ``/proc`` (Linux), for the benchmarks that split a run's CPU by process or
thread. No imports beyond the standard library: bench/cameras.py uses it without pulling
in the controller."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_s(stat: str, *, children: bool = False) -> float:
    """utime + stime in seconds of a ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``)
    line; ``children``: plus cutime + cstime, the CPU of its children that ended (and were
    waited for), such as PostgreSQL backends whose connection closed."""
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def cpu_s(stat: Path) -> float:
    """utime + stime in seconds of a process or thread, from its ``stat`` file."""
    return stat_cpu_s(stat.read_text())


def machine_busy_s(stat: Path = Path("/proc/stat")) -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, summed over its CPUs, from the
    first line of ``/proc/stat``: busy is everything but idle and iowait, so it includes
    what no process's ``stat`` shows (softirq work such as loopback networking, and processes
    that ended)."""
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS, (busy + idle + iowait) / CLOCK_TICKS


def process_cpu_s() -> float:
    """Time on a CPU of every thread of this process so far (schedstat: nanoseconds)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9
