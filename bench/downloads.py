"""What a bundle download costs the controller: CPU per download against CPU per ``/healthz``.

One ``controller serve`` process (as deployed; bench/cluster.py) on a fresh PostgreSQL schema
(``--sqlite``: SQLite) with ``models.storage`` at its default for that database, one bundle of
the shipped INT8 BlazeFace (about 120 KiB) uploaded, then rounds of ``--requests`` keep-alive
downloads through the device's URL (``?key=``), each round followed by as many ``/healthz``
(the cheapest request: the baseline, in the same process and the same minute). The
controller's CPU time (``/proc/PID/stat``) is read around every batch.

Reports, per round: ms of controller CPU per download, per ``/healthz``, and their ratio; the
median over rounds. ``--baseline DIR`` runs the same rounds against the controller of another
checkout (e.g. ``git archive HEAD~1 | tar -x -C DIR``), alternating with this one, so a change
is compared within one run. The first round of each is a warm-up (the bundle cache fills) and
is not counted.

Run: ``.venv/bin/python -m bench.downloads [--rounds 5] [--requests 200] [--baseline DIR]``.
Not a test: nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.cluster import REPO, Cluster, cpu_s, face_bundle, operator_token
from bench.postgres import fresh_schema
from controller.broker import EmbeddedBroker


@dataclass
class Target:
    """One controller under test: its process (in ``cluster``) and a keep-alive client."""

    name: str
    cluster: Cluster
    http: httpx.Client
    bundle_url: str
    size: int

    @property
    def pid(self) -> int:
        return self.cluster.procs[0].pid


def _start(name: str, root: Path, tmp: Path, db_url: str, broker: EmbeddedBroker) -> Target:
    cluster = Cluster(tmp, db_url, broker, 1, repo=root)
    cluster.start()
    base = f"http://127.0.0.1:{cluster.ports[0]}"
    auth = {"Authorization": f"Bearer {operator_token(db_url)}"}
    efb = face_bundle(tmp)
    with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
        answer = http.post("/api/v1/models", content=efb.read_bytes())
        if answer.status_code == 409:  # a second target on the same database
            answer = http.get("/api/v1/models/face/2.0.0")
        answer.raise_for_status()
    url = str(answer.json()["download_url"])
    device = httpx.Client(base_url=base, timeout=60)  # devices send no token
    return Target(name, cluster, device, url, efb.stat().st_size)


def _cpu_ms_per_request(target: Target, path: str, n: int, expect: int) -> float:
    before = cpu_s(target.pid)
    for _ in range(n):
        answer = target.http.get(path)
        if answer.status_code != 200 or (expect and len(answer.content) != expect):
            raise SystemExit(f"{target.name}: GET {path} answered {answer.status_code}")
    return (cpu_s(target.pid) - before) * 1000.0 / n


def run(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-downloads-") as tmp_name:
        tmp = Path(tmp_name)
        drop = None
        if args.sqlite:
            db_url = f"sqlite:///{tmp / 'controller.db'}"
        else:
            db_url, drop = fresh_schema()
        broker = EmbeddedBroker(workdir=tmp / "broker", port=0)
        broker.start()
        targets: list[Target] = []
        try:
            roots = [("this", REPO)] + (
                [("baseline", Path(args.baseline))] if args.baseline else []
            )
            for name, root in roots:
                folder = tmp / name
                folder.mkdir()
                targets.append(_start(name, root, folder, db_url, broker))
            for round_no in range(args.rounds + 1):
                for target in targets if round_no % 2 == 0 else reversed(targets):
                    download = _cpu_ms_per_request(
                        target, target.bundle_url, args.requests, target.size
                    )
                    healthz = _cpu_ms_per_request(target, "/healthz", args.requests, 0)
                    if round_no == 0:
                        continue  # warm-up: the cache fills, the code paths are imported
                    results.setdefault(target.name, []).append((download, healthz))
                    print(
                        f"  round {round_no} {target.name:8s}: download {download:6.2f} ms, "
                        f"/healthz {healthz:5.2f} ms of controller CPU "
                        f"(ratio {download / healthz:4.2f})",
                        flush=True,
                    )
        finally:
            for target in targets:
                target.http.close()
                target.cluster.stop()
            broker.stop()
            if drop is not None:
                drop()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="downloads per round")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--baseline", help="a checkout whose controller runs the same rounds")
    args = parser.parse_args(argv)
    print(
        f"{'SQLite' if args.sqlite else 'PostgreSQL'}; {args.rounds} rounds of "
        f"{args.requests} downloads and {args.requests} /healthz per controller",
        flush=True,
    )
    results = run(args)
    for name, rows in results.items():
        download = statistics.median(d for d, _ in rows)
        healthz = statistics.median(h for _, h in rows)
        ratio = statistics.median(d / h for d, h in rows)
        print(
            f"{name:8s} median: download {download:.2f} ms, /healthz {healthz:.2f} ms, "
            f"download / healthz {ratio:.2f}"
        )
    if "baseline" in results:
        this = statistics.median(d for d, _ in results["this"])
        base = statistics.median(d for d, _ in results["baseline"])
        print(f"download CPU this / baseline: {this / base:.2f}")


if __name__ == "__main__":
    main()
