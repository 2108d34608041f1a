"""A :class:`~tools.simulator.fleet.SimulatedFleet` split over several processes
(:class:`FleetProcesses`), for benchmarks at 10,000 devices and more.

One process simulating 10,000 devices runs about 110 threads (MQTT network loops, the
scheduler, the download pool) on one interpreter lock: measured in ``bench.rollout``, its
devices' phase steps started 6 s late at the median (11 s at the 99th percentile) while its
scheduler thread was busy only half the time, so the benchmark measured the simulator's lock
as much as the controllers. Here each child process runs its own fleet of a contiguous slice
of the device ids, with its own connections, scheduler, download pool and telemetry loop; the
parent sends each command to every child at once and gathers their answers. On a machine
whose cores are already full this only adds work (docs/scaling.md: no gain at 10,000
devices on 2 cores, 1.17x slower at 50,000 with 8 processes); it is for one with cores to
spare.

Children are started with ``spawn`` (the parent may already run threads: a fork would copy
their locks held). A child that fails a command answers with its error, raised here as
:class:`SimulatorError`; a child that dies is reported the same way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from tools.simulator.fleet import FleetSummary, SimulatedFleet
from tools.simulator.ota import OtaBehaviour

__all__ = ["FleetProcesses", "SimulatorError"]

REPLY_TIMEOUT_S = 300.0
"""Longest wait for one child's answer to one command (connecting 10,000 devices included)."""


class SimulatorError(RuntimeError):
    """A simulated fleet's child process failed a command or died."""


class FleetProcesses:
    """``processes`` child processes, each a :class:`SimulatedFleet` of a slice of
    ``device_ids``; the other keyword arguments go to every child's fleet unchanged."""

    def __init__(
        self,
        *,
        device_ids: Sequence[str],
        behaviour: OtaBehaviour,
        processes: int,
        **fleet_kwargs: Any,
    ) -> None:
        if processes < 1:
            raise SimulatorError(f"processes must be at least 1, not {processes}")
        ids = list(device_ids)
        size = -(-len(ids) // processes)
        slices = [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        for n, part in enumerate(slices):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_child_main,
                args=(child, part, behaviour, fleet_kwargs),
                name=f"sim-fleet-{n}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def _all(self, command: str, arg: Any = None, timeout: float = REPLY_TIMEOUT_S) -> list[Any]:
        for pipe in self._pipes:
            pipe.send((command, arg))
        answers = []
        for n, (pipe, proc) in enumerate(zip(self._pipes, self._procs, strict=True)):
            if not pipe.poll(timeout):
                state = "died" if not proc.is_alive() else f"did not answer in {timeout:g} s"
                raise SimulatorError(f"simulated fleet process {n} {state} ({command})")
            try:
                ok, value = pipe.recv()
            except EOFError:
                raise SimulatorError(
                    f"simulated fleet process {n} died ({command}, exit code {proc.exitcode})"
                ) from None
            if not ok:
                raise SimulatorError(f"simulated fleet process {n} failed {command}: {value}")
            answers.append(value)
        return answers

    def connect(self, timeout: float = 120.0) -> None:
        self._all("connect", timeout, timeout=timeout + 10)

    def announce(self) -> None:
        self._all("announce")

    def start_telemetry(self, interval_s: float) -> None:
        """Every child publishes its devices' telemetry every ``interval_s`` on its own."""
        self._all("telemetry_every", interval_s)

    def summary(self, model: str, stream: str = "cam0") -> FleetSummary:
        parts: list[FleetSummary] = self._all("summary", (model, stream))
        return sum(parts[1:], parts[0])

    def stop(self) -> None:
        for pipe, proc in zip(self._pipes, self._procs, strict=True):
            with contextlib.suppress(OSError):  # the child is gone already
                pipe.send(("stop", None))
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            pipe.close()


def _child_main(
    conn: Connection, ids: list[str], behaviour: OtaBehaviour, kwargs: dict[str, Any]
) -> None:
    fleet = SimulatedFleet(device_ids=ids, behaviour=behaviour, **kwargs)
    while True:
        try:
            command, arg = conn.recv()
        except EOFError:  # the parent went away
            command, arg = "stop", None
        try:
            value = _command(fleet, command, arg)
        except Exception as err:  # noqa: BLE001 - sent to the parent, raised there
            conn.send((False, f"{type(err).__name__}: {err}"))
            continue
        if command == "stop":
            return
        conn.send((True, value))


def _command(fleet: SimulatedFleet, command: str, arg: Any) -> Any:
    if command == "connect":
        fleet.connect(timeout=arg)
    elif command == "announce":
        fleet.announce()
    elif command == "telemetry_every":
        fleet.start_telemetry(arg)
    elif command == "summary":
        return fleet.summary(*arg)
    elif command == "stop":
        fleet.stop()
    else:
        raise ValueError(f"unknown command {command!r}")
    return None
