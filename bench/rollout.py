"""Rollout benchmark: a staged rollout across N simulated devices on one machine.

A local Mosquitto, ``--replicas`` controller processes (``edgefleet controller serve``, as
deployed; several share PostgreSQL and an MQTT shared group, behind a round-robin TCP
balancer that is their ``api.public_url``: bench/cluster.py), and ``SimulatedFleet`` devices
(protocol-level, a few shared MQTT connections; split over ``--sim-processes`` child
processes, by default none: the bench process simulates them; ``--baseline-sim-processes
N`` runs the same rollout first with another split) that act on their desired states:
downloading → … → committed, each phase reported after ``--phase-delay``. The bench uploads a bundle, creates a rollout (``--stages``,
``--bake``) and follows it over the API until it completed, then reports:

* the time beyond the bake times (wall time minus stages × bake): what the controller,
  the broker and the devices add; per stage, assignment → every device done;
* each controller process's CPU time and RSS (peak) during the rollout, which one led,
  and the database size after it;
* the whole machine's CPU time during the rollout by process (controllers, the bench
  process with the simulated devices, Mosquitto, PostgreSQL's backends, …): what the wall
  time is made of on a machine they share;
* a check that every device runs the target and got exactly one rev carrying it.

``--scale N,N,...`` adds the engine alone: the time of one ``tick`` of a rollout whose N
executions are all in progress (every one re-derived from the reported state, which
carries the shadow phase's health-gate evidence), on the chosen database: what bounds how
far one controller scales.

``--ingest DEVICES,PER_DEVICE`` adds the ingestion throughput of 1 and ``--replicas``
controllers (telemetry published as fast as the broker takes it, until every row is stored).

Usage: ``.venv/bin/python -m bench.rollout [--devices 1000] [--bake 2s] [--pg]
[--replicas 3 --download] [--ingest 1000,20]``.
Not a test: nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from bench import procstat
from bench.cluster import (
    Cluster,
    cpu_split,
    database_bytes,
    face_bundle,
    ingest_rate,
    machine_cpu,
    operator_token,
)
from bench.engine_ticks import tick_scale
from bench.postgres import fresh_schema
from controller.broker import EmbeddedBroker
from controller.db.session import Database
from controller.rollouts.spec import format_duration, parse_duration
from tools.simulator.fleet import SimulatedFleet
from tools.simulator.fleet_procs import FleetProcesses
from tools.simulator.ota import OtaBehaviour

REPO = Path(__file__).resolve().parent.parent
TARGET = "face@2.0.0"


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def run_rollout(
    args: argparse.Namespace,
    tmp: Path,
    db_url: str,
    repo: Path = REPO,
    sim_processes: int | None = None,
) -> dict[str, Any]:
    """One rollout through the controllers of checkout ``repo`` (this one by default), the
    devices simulated in ``sim_processes`` child processes (0: in this one; None:
    ``args.sim_processes``)."""
    processes = args.sim_processes if sim_processes is None else sim_processes
    tmp.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(workdir=tmp / "broker", port=0)
    broker.start()
    cluster = Cluster(
        tmp,
        db_url,
        broker,
        args.replicas,
        tick_s=args.tick,
        bundle_cache_bytes=args.bundle_cache,
        repo=repo,
    )
    fleet: SimulatedFleet | FleetProcesses | None = None
    try:
        cluster.start()
        token = operator_token(db_url)
        db = Database.from_url(db_url)
        http = httpx.Client(
            base_url=cluster.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        http.post("/api/v1/models", content=face_bundle(tmp).read_bytes()).raise_for_status()

        fleet_args: dict[str, Any] = {
            "broker_url": broker.url,
            "username": broker.username,
            "password": broker.password,
            "device_ids": [f"sim-{i:05d}" for i in range(args.devices)],
            "behaviour": OtaBehaviour(
                phase_delay_s=args.phase_delay, download=args.download, download_retry_s=120
            ),
            "per_connection": args.per_connection,
            "telemetry_interval_s": args.telemetry_interval,
            "download_workers": -(-args.download_workers // max(processes, 1)),
        }
        if processes:
            fleet = FleetProcesses(processes=processes, **fleet_args)
        else:
            fleet = SimulatedFleet(**fleet_args)
        fleet.connect(timeout=300)
        fleet.announce()
        fleet.start_telemetry(args.telemetry_interval)

        def known() -> bool:
            with db.connect() as conn:
                n = conn.execute(
                    text("SELECT count(DISTINCT device_id) FROM device_streams")
                ).scalar_one()
            return bool(n >= args.devices)

        _wait(known, 300, f"{args.devices} devices in the controller")
        db.dispose()
        time.sleep(1.0)
        machine0, busy0 = machine_cpu(), procstat.machine_busy_s()
        cpu0, t0 = cluster.cpu(), time.monotonic()
        body = {
            "model": TARGET,
            "select": ["all"],
            "stages": args.stages,
            "bake_s": args.bake_s,
            "timeout_s": 900,
            "max_failures": 0.05,
        }
        created = http.post("/api/v1/rollouts", json=body)
        created.raise_for_status()
        rid = created.json()["id"]
        rss_peak = [0] * args.replicas
        while True:
            r = http.get(f"/api/v1/rollouts/{rid}", params={"devices": "false"}).json()
            rss_peak = [max(a, b) for a, b in zip(rss_peak, cluster.rss_kib(), strict=True)]
            if r["state"] != "active":
                break
            time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu = [b - a for a, b in zip(cpu0, cluster.cpu(), strict=True)]
        roles = {p.pid: f"controller {i}" for i, p in enumerate(cluster.procs)}
        roles[os.getpid()] = "bench process" + ("" if processes else " (simulator)")
        if isinstance(fleet, FleetProcesses):
            roles.update({pid: f"simulator ({processes} processes)" for pid in fleet.pids})
        if broker.proc is not None:
            roles[broker.proc.pid] = "mosquitto"
        if cluster.balancer is not None:
            roles[cluster.balancer.pid] = "balancer"
        machine = cpu_split(machine0, machine_cpu(), roles)
        busy1 = procstat.machine_busy_s()
        ended = fleet.summary(TARGET)
        shown = http.get(f"/api/v1/rollouts/{rid}").json()["devices"]
        passed = sum(1 for d in shown if (d["evidence"] or {}).get("verdict") == "pass")
        return {
            "state": r["state"],
            "wall_s": wall,
            "bake_total_s": args.bake_s * len(r["stages"]),
            "stages": [(s["devices"], s["started_at"], s["done_at"]) for s in r["stage_progress"]],
            "created_at": r["created_at"],
            "cpu_s": cpu,
            "machine_cpu_s": machine,
            "machine_busy_s": (busy1[0] - busy0[0], busy1[1] - busy0[1]),
            "rss_peak_kib": rss_peak,
            "rss_hwm_kib": cluster.hwm_kib(),
            "leaders": cluster.leaders(),
            "db_bytes": database_bytes(db_url),
            "devices_on_target": ended.on_model,
            "devices_one_rev": ended.one_rev,
            "sim_processes": processes,
            "gate_passed": passed,
            "counts": r["counts"],
        }
    finally:
        if fleet is not None:
            fleet.stop()
        cluster.stop()
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--stages", default="1,10%,50%,100%")
    parser.add_argument("--bake", default="2s", help="bake time per stage")
    parser.add_argument(
        "--phase-delay", type=float, default=0.05, help="simulated seconds per OTA phase"
    )
    parser.add_argument(
        "--tick", type=float, default=1.0, help="controller rollouts.tick_interval_s"
    )
    parser.add_argument("--telemetry-interval", type=float, default=5.0)
    parser.add_argument(
        "--per-connection", type=int, default=250, help="devices per MQTT connection"
    )
    parser.add_argument(
        "--download", action="store_true", help="devices really download the bundle"
    )
    parser.add_argument("--pg", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="controller processes (>1: PostgreSQL, shared group)",
    )
    parser.add_argument(
        "--download-workers",
        type=int,
        default=64,
        help="simulated concurrent downloads (split over the simulator processes)",
    )
    parser.add_argument(
        "--sim-processes",
        type=int,
        default=0,
        help="child processes simulating the devices (default 0: the bench process itself; "
        "measured no faster on 2 cores, docs/scaling.md)",
    )
    parser.add_argument(
        "--baseline-sim-processes",
        type=int,
        default=None,
        metavar="N",
        help="run the same rollout first with the devices in N simulator processes",
    )
    parser.add_argument(
        "--bundle-cache",
        type=int,
        default=None,
        metavar="BYTES",
        help="the replicas' models.cache_bytes (0: every download reads the database)",
    )
    parser.add_argument(
        "--ingest",
        default="",
        metavar="DEVICES,PER_DEVICE",
        help="also measure ingestion throughput with 1 and --replicas controllers",
    )
    parser.add_argument("--skip-rollout", action="store_true", help="only --scale / --ingest")
    parser.add_argument(
        "--baseline",
        help="a checkout whose controllers run the same rollout first (git archive of a commit)",
    )
    parser.add_argument(
        "--scale",
        default="",
        help="also time engine ticks at these execution counts, e.g. 1000,10000,50000",
    )
    args = parser.parse_args()
    args.bake_s = parse_duration(args.bake)
    if args.replicas > 1 and not args.pg:
        parser.error("--replicas > 1 needs --pg (replicas share a PostgreSQL database)")

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-rollout-") as tmp_name:
        tmp = Path(tmp_name)
        cleanups: list[Callable[[], None]] = []

        def url(name: str) -> str:
            if args.pg:
                u, drop = fresh_schema()
                cleanups.append(drop)
                return u
            return f"sqlite:///{tmp / name}"

        try:
            base = None
            if (args.baseline or args.baseline_sim_processes is not None) and not args.skip_rollout:
                base = run_rollout(
                    args,
                    tmp / "baseline",
                    url("baseline.db"),
                    Path(args.baseline).resolve() if args.baseline else REPO,
                    args.baseline_sim_processes,
                )
            res = None if args.skip_rollout else run_rollout(args, tmp, url("controller.db"))
            ingest = []
            if args.ingest:
                n_dev, per_dev = (int(x) for x in args.ingest.split(","))
                for n in sorted({1, args.replicas}):
                    sub = tmp / f"ingest-{n}"
                    sub.mkdir()
                    ingest.append(
                        ingest_rate(
                            sub,
                            url(f"ingest-{n}.db"),
                            replicas=n,
                            devices=n_dev,
                            per_device=per_dev,
                        )
                    )
            scale = [
                (n, tick_scale(url(f"scale-{n}.db"), n))
                for n in (int(x) for x in args.scale.split(",") if x)
            ]
        finally:
            for drop in cleanups:
                drop()

    _print_results(args, base, res, ingest, scale)
    return 0


def _print_results(
    args: argparse.Namespace,
    base: dict[str, Any] | None,
    res: dict[str, Any] | None,
    ingest: list[dict[str, Any]],
    scale: list[tuple[int, dict[str, float]]],
) -> None:
    db_name = "PostgreSQL" if args.pg else "SQLite"
    if base is not None:
        print(f"\nbaseline ({args.baseline or 'this checkout'}):", end="")
        _print_rollout(args, base, db_name)
    if res is not None:
        _print_rollout(args, res, db_name)
    if base is not None and res is not None:
        ratio = (res["wall_s"] - res["bake_total_s"]) / (base["wall_s"] - base["bake_total_s"])
        print(
            f"\nthis / baseline: {ratio:.2f} beyond the bake times, "
            f"{sum(res['cpu_s']) / sum(base['cpu_s']):.2f} controllers' CPU"
        )
    for r in ingest:
        print(
            f"\ningestion, {r['replicas']} controller(s): {r['messages']} telemetry messages "
            f"stored in {r['seconds']:.1f}s = {r['rate']:.0f} msg/s (published in "
            f"{r['published_s']:.1f}s); CPU s per replica "
            f"{', '.join(f'{c:.1f}' for c in r['cpu_s'])}; RSS high-water MiB "
            f"{', '.join(f'{m / 1024:.0f}' for m in r['rss_kib'])}; "
            f"{r['bytes_per_row']:.0f} bytes per telemetry row (table with indexes)"
        )
    if len(ingest) == 2:
        print(f"  ratio {ingest[1]['rate'] / ingest[0]['rate']:.2f}x with {args.replicas} replicas")
    if scale:
        print(f"\nengine ticks of one rollout ({db_name}), ms:")
        print(
            "  executions | assign | in progress: all re-derived / a tenth reported / none"
            " | succeeded: all re-derived / between"
        )
        for n, t in scale:
            ms = {k: v * 1000 for k, v in t.items()}
            print(
                f"  {n:>10} | {ms['assign']:6.0f} | {ms['in_flight_full']:7.0f} / "
                f"{ms['in_flight_tenth']:7.1f} / {ms['in_flight_quiet']:6.1f} | "
                f"{ms['succeeded_full']:7.0f} / {ms['succeeded_between']:6.1f}"
            )


def _print_rollout(args: argparse.Namespace, res: dict[str, Any], db_name: str) -> None:
    beyond = res["wall_s"] - res["bake_total_s"]
    n = res["sim_processes"]
    where = f"{n} process{'es' if n > 1 else ''}" if n else "the bench process"
    print(
        f"\nrollout of {TARGET} to {args.devices} simulated devices through {args.replicas} "
        f"controller(s) ({db_name}, stages {args.stages}, bake {format_duration(args.bake_s)}, "
        f"tick {args.tick}s, phase delay {args.phase_delay}s x 7 phases"
        f"{', real downloads' if args.download else ''}; devices simulated in {where})"
    )
    print(f"  result: {res['state']}, {res['counts']}")
    print(
        f"  devices on the target: {res['devices_on_target']}/{args.devices}; "
        f"exactly one rev carrying it: {res['devices_one_rev']}/{args.devices}; "
        f"health gate evidence kept (pass): {res['gate_passed']}/{args.devices}"
    )
    print(
        f"  wall time {res['wall_s']:.1f}s = bake {res['bake_total_s']:.1f}s + "
        f"{beyond:.1f}s beyond the bake times"
    )
    start = res["created_at"]
    for i, (devices, started, done) in enumerate(res["stages"], start=1):
        if started is None or done is None:
            continue
        print(
            f"    stage {i} ({devices:>5} devices cumulative): assigned at "
            f"+{started - start:5.1f}s, all done after {done - started:4.1f}s"
        )
    for n, (cpu, peak, hwm, lead) in enumerate(
        zip(res["cpu_s"], res["rss_peak_kib"], res["rss_hwm_kib"], res["leaders"], strict=True)
    ):
        print(
            f"  controller {n}{' (rollout leader)' if lead else ''}: CPU {cpu:.1f}s "
            f"({cpu / res['wall_s'] * 100:.0f}% of one core), RSS peak {peak / 1024:.0f} MiB "
            f"(high-water {hwm / 1024:.0f} MiB)"
        )
    print(f"  database size after the rollout: {res['db_bytes'] / 2**20:.1f} MiB")
    split = sorted(res["machine_cpu_s"].items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in split)
    cores = total / res["wall_s"]
    busy, available = res["machine_busy_s"]
    print(
        f"  the machine during the rollout (/proc/stat): {busy:.1f} s busy of {available:.1f} s "
        f"({busy / available:.0%}); processes {total:.1f} s ({cores:.2f} cores), the rest "
        f"{busy - total:.1f} s (the kernel's own work, such as loopback networking):"
    )
    print("    " + ", ".join(f"{role} {v:.1f} s" for role, v in split if v >= 0.5))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
