"""Rollout benchmark: a staged rollout across N simulated devices on one machine.

A local Mosquitto, the controller as its own process (``edgefleet controller serve``, as
deployed), and ``SimulatedFleet`` devices (protocol-level, a few shared MQTT connections)
that act on their desired states: downloading → … → committed, each phase reported after
``--phase-delay``. The bench uploads a bundle, creates a rollout (``--stages``,
``--bake``) and follows it over the API until it completed, then reports:

* the time beyond the bake times (wall time minus stages × bake): what the controller,
  the broker and the devices add; per stage, assignment → every device done;
* the controller process's CPU time and RSS (peak) during the rollout;
* a check that every device runs the target and got exactly one rev carrying it.

``--scale N,N,...`` adds the engine alone: the time of one ``tick`` of a rollout whose N
executions are all in progress (every one re-derived from the reported state, which
carries the shadow phase's health-gate evidence), on the chosen database: what bounds how
far one controller scales.

Usage: ``.venv/bin/python -m bench.rollout [--devices 1000] [--bake 2s] [--pg]``.
Not a test: nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.postgres import fresh_schema
from controller.broker import EmbeddedBroker
from controller.db.session import Database
from controller.fleet.registry import add_model
from controller.fleet.tokens import create_token
from controller.fleet.writes import Received, write_messages
from controller.rollouts import commands
from controller.rollouts.engine import RolloutEngine
from controller.rollouts.records import status_counts
from controller.rollouts.spec import format_duration, parse_duration
from protocol import Reported, Status, StreamReport, StreamStatus
from tests.broker import free_port
from tests.bundle_factory import blazeface_files, blazeface_manifest, build_bundle
from tools.simulator.fleet import SimulatedFleet
from tools.simulator.gate import evidence
from tools.simulator.ota import OtaBehaviour

REPO = Path(__file__).resolve().parent.parent
TARGET = "face@2.0.0"
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _mem_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def run_rollout(args: argparse.Namespace, tmp: Path, db_url: str) -> dict[str, Any]:
    broker = EmbeddedBroker(workdir=tmp / "broker", port=0)
    broker.start()
    port = free_port()
    config = tmp / "controller.toml"
    config.write_text(
        f'data_dir = "{tmp / "data"}"\nlog_level = "warning"\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[broker]\nurl = "{broker.url}"\nusername = "{broker.username}"\n'
        f'password = "{broker.password}"\nclient_id = "bench-ctl-{port}"\n'
        f"[api]\nport = {port}\n"
        f"[rollouts]\ntick_interval_s = {args.tick}\n"
    )
    log = (tmp / "controller.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", "controller", "serve", "--config", str(config)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    fleet: SimulatedFleet | None = None
    stop_telemetry = threading.Event()
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise SystemExit(
                    f"the controller exited: {(tmp / 'controller.log').read_text()[-2000:]}"
                )
            try:
                return bool(httpx.get(f"{url}/healthz", timeout=1).json()["mqtt"] == "connected")
            except httpx.HTTPError:
                return False

        _wait(healthy, 60, "the controller")
        db = Database.from_url(db_url)
        with db.begin() as conn:
            _, token = create_token(conn, name="bench", role="operator", now=time.time())
        db.dispose()
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        efb = build_bundle(
            tmp / "face.efb",
            blazeface_manifest(name="face", version="2.0.0"),
            blazeface_files(),
            key=None,
        )
        http.post("/api/v1/models", content=efb.read_bytes()).raise_for_status()

        ids = [f"sim-{i:05d}" for i in range(args.devices)]
        fleet = SimulatedFleet(
            broker_url=broker.url,
            username=broker.username,
            password=broker.password,
            device_ids=ids,
            behaviour=OtaBehaviour(phase_delay_s=args.phase_delay, download=args.download),
            per_connection=args.per_connection,
            telemetry_interval_s=args.telemetry_interval,
        )
        fleet.connect()
        fleet.announce()

        sim = fleet

        def telemetry() -> None:
            while not stop_telemetry.wait(args.telemetry_interval):
                sim.publish_telemetry()

        threading.Thread(target=telemetry, daemon=True).start()

        def known() -> bool:
            found = http.get("/api/v1/devices", params={"limit": 10_000}).json()["devices"]
            return bool(sum(1 for d in found if d["streams"]) >= args.devices)

        _wait(known, 120, f"{args.devices} devices in the controller")
        time.sleep(1.0)
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        body = {
            "model": TARGET,
            "select": ["all"],
            "stages": args.stages,
            "bake_s": args.bake_s,
            "timeout_s": 600,
            "max_failures": 0.05,
        }
        created = http.post("/api/v1/rollouts", json=body)
        created.raise_for_status()
        rid = created.json()["id"]
        rss_peak = 0
        while True:
            r = http.get(f"/api/v1/rollouts/{rid}", params={"devices": "false"}).json()
            rss_peak = max(rss_peak, _mem_kib(proc.pid, "VmRSS"))
            if r["state"] != "active":
                break
            time.sleep(0.1)
        wall = time.monotonic() - t0
        cpu = _cpu_s(proc.pid) - cpu0
        stop_telemetry.set()
        ok_active = sum(1 for d in fleet.devices.values() if d.streams["cam0"]["active"] == TARGET)
        one_rev = sum(1 for d in fleet.devices.values() if len(d.revs_with(TARGET)) == 1)
        shown = http.get(f"/api/v1/rollouts/{rid}").json()["devices"]
        passed = sum(1 for d in shown if (d["evidence"] or {}).get("verdict") == "pass")
        return {
            "state": r["state"],
            "wall_s": wall,
            "bake_total_s": args.bake_s * len(r["stages"]),
            "stages": [(s["devices"], s["started_at"], s["done_at"]) for s in r["stage_progress"]],
            "created_at": r["created_at"],
            "cpu_s": cpu,
            "rss_peak_kib": rss_peak,
            "rss_hwm_kib": _mem_kib(proc.pid, "VmHWM"),
            "devices_on_target": ok_active,
            "devices_one_rev": one_rev,
            "gate_passed": passed,
            "counts": r["counts"],
        }
    finally:
        stop_telemetry.set()
        if fleet is not None:
            fleet.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        broker.stop()


def tick_scale(db_url: str, executions: int) -> tuple[float, float]:
    """Seconds of one engine tick with ``executions`` in flight (and of the stage assignment)."""
    db = Database.from_url(db_url)
    db.upgrade()
    now = time.time()
    ids = [f"dev-{i:06d}" for i in range(executions)]
    items = []
    for d in ids:
        items.append(
            Received(
                topic="t",
                device_id=d,
                received_at=now,
                message=Status(
                    schema=1,
                    device_id=d,
                    state="online",
                    ts=now,
                    agent_version="1",
                    started_at=now,
                    streams=[StreamStatus(name="cam0", source_state="running", model="base@1")],
                ),
            )
        )
    with db.begin() as conn:
        for i in range(0, len(items), 5000):
            write_messages(conn, items[i : i + 5000])
        add_model(
            conn, name="m", version="2", sha256="0" * 64, size=1, runtime="litert", manifest={},
            signature=None, key_id=None, now=now,
        )  # fmt: skip
        r = commands.create_rollout(
            conn, commands.RolloutRequest(model="m@2", select=["all"], stages="100%"), now=now
        )
    engine = RolloutEngine(db, base_url=lambda: "http://bench", clock=time.time)
    t0 = time.perf_counter()
    engine.tick()
    assign = time.perf_counter() - t0
    rng = random.Random(0)
    reports = [
        Received(
            topic="t",
            device_id=d,
            received_at=now,
            message=Reported(
                schema=1,
                device_id=d,
                ts=now,
                desired_rev=1,
                streams={
                    "cam0": StreamReport(
                        active="base@1", phase="shadow", target="m@2", gate=evidence("shadow", rng)
                    )
                },
            ),
        )
        for d in ids
    ]
    with db.begin() as conn:
        for i in range(0, len(reports), 5000):
            write_messages(conn, reports[i : i + 5000])
    engine.tick()  # queued → in_progress: every row written once
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.tick()
        times.append(time.perf_counter() - t0)
    with db.connect() as conn:
        assert status_counts(conn, [r.id])[r.id] == {"in_progress": executions}
    db.dispose()
    return min(times), assign


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
        "--scale",
        default="",
        help="also time engine ticks at these execution counts, e.g. 1000,10000,50000",
    )
    args = parser.parse_args()
    args.bake_s = parse_duration(args.bake)

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
            res = run_rollout(args, tmp, url("controller.db"))
            scale = [
                (n, *tick_scale(url(f"scale-{n}.db"), n))
                for n in (int(x) for x in args.scale.split(",") if x)
            ]
        finally:
            for drop in cleanups:
                drop()

    db_name = "PostgreSQL" if args.pg else "SQLite"
    beyond = res["wall_s"] - res["bake_total_s"]
    print(
        f"\nrollout of {TARGET} to {args.devices} simulated devices ({db_name}, stages {args.stages}, "
        f"bake {format_duration(args.bake_s)}, tick {args.tick}s, phase delay {args.phase_delay}s x 7 phases"
        f"{', real downloads' if args.download else ''})"
    )
    print(f"  result: {res['state']}, {res['counts']}")
    print(
        f"  devices on the target: {res['devices_on_target']}/{args.devices}; "
        f"exactly one rev carrying it: {res['devices_one_rev']}/{args.devices}; "
        f"health gate evidence kept (pass): {res['gate_passed']}/{args.devices}"
    )
    print(
        f"  wall time {res['wall_s']:.1f}s = bake {res['bake_total_s']:.1f}s + {beyond:.1f}s beyond the bake times"
    )
    start = res["created_at"]
    for i, (devices, started, done) in enumerate(res["stages"], start=1):
        if started is None or done is None:
            continue
        print(
            f"    stage {i} ({devices:>5} devices cumulative): assigned at +{started - start:5.1f}s, "
            f"all done after {done - started:4.1f}s"
        )
    print(
        f"  controller CPU {res['cpu_s']:.1f}s during the rollout ({res['cpu_s'] / res['wall_s'] * 100:.0f}% of one core), "
        f"RSS peak {res['rss_peak_kib'] / 1024:.0f} MiB (process high-water mark {res['rss_hwm_kib'] / 1024:.0f} MiB)"
    )
    if scale:
        print(f"\nengine tick with every execution in progress ({db_name}):")
        for n, tick, assign in scale:
            print(
                f"  {n:>7} executions: tick {tick * 1000:7.0f} ms, stage assignment {assign * 1000:7.0f} ms"
            )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
