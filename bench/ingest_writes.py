"""CPU per telemetry message of the controller's write path (``collect`` + ``write_batch``)
on PostgreSQL, without MQTT: what each ingested message costs a replica in Python and
psycopg, the part the controller's code decides.

2,000 devices, batches of 500 telemetry messages (one device each), ``last_seen`` touched on
every fourth batch (as the ingestor throttles it); CPU time of the writing process per
message. ``--baseline DIR`` runs the same measurement with another checkout's code (e.g. a
``git archive`` of the commit before), alternating rounds, each in a fresh process and
schema, so both see the same machine load.

Usage: ``.venv/bin/python -m bench.ingest_writes [--rounds 3] [--baseline DIR]``.
Not a test: nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = """
import time
from bench.postgres import fresh_schema
from controller.db.session import Database
from controller.fleet.writes import Received, collect, write_batch
from protocol import StreamTelemetry, Telemetry

url, drop = fresh_schema()
try:
    db = Database.from_url(url)
    db.upgrade()
    now = time.time()

    def tele(d, k):
        stream = StreamTelemetry(
            name="cam0", source_state="running", fps=15, frames_captured=1,
            frames_processed=1, frames_dropped=0, infer_ms_p50=1, infer_ms_p95=2,
            latency_ms_p50=1, latency_ms_p95=2,
        )
        msg = Telemetry(
            schema=1, device_id=d, ts=now + k, interval_s=5.0, cpu_percent=10,
            mem_percent=10, mem_used_bytes=1, temp_c=None, disk_percent=10,
            disk_free_bytes=1, spool_depth=0, spool_dropped=0, streams=[stream],
        )
        return Received(topic="t", device_id=d, received_at=now + k, message=msg)

    ids = [f"dev-{i:05d}" for i in range(2000)]
    first = collect([tele(d, 0) for d in ids])
    with db.begin() as conn:
        write_batch(conn, first, touch=first.seen)
    batches = [[tele(ids[(b * 500 + j) % 2000], b + 1) for j in range(500)] for b in range(40)]
    c0 = time.process_time()
    for i, items in enumerate(batches):
        batch = collect(items)
        with db.begin() as conn:
            write_batch(conn, batch, touch=batch.seen if i % 4 == 0 else None)
    print((time.process_time() - c0) / 20000 * 1e6)
    db.dispose()
finally:
    drop()
"""


def one_round(repo: Path) -> float:
    """Microseconds of CPU per message with ``repo``'s code (a fresh process and schema)."""
    out = subprocess.run(
        [sys.executable, "-c", WORKER],
        cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a checkout whose write path runs the same rounds")
    args = parser.parse_args()
    trees = [("this", REPO)] + (
        [("baseline", Path(args.baseline).resolve())] if args.baseline else []
    )
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, repo in trees:
            results[name].append(one_round(repo))
    for name, values in results.items():
        print(
            f"{name}: {statistics.median(values):.1f} us CPU per telemetry message "
            f"(rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )
    if args.baseline:
        ratio = statistics.median(results["this"]) / statistics.median(results["baseline"])
        print(f"this / baseline: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
