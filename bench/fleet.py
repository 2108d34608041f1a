"""Fleet page benchmark: ``fleet_page`` (and ``GET /api/v1/fleet``) with 10,000 devices.

Inserts N devices (3 tags each, 2 streams each, the latest telemetry summary on both; about
5% never sent telemetry, so their values are NULL) into SQLite (WAL, as the controller
opens it) and into PostgreSQL (a throwaway schema, see bench/postgres.py), then times, per
database, the median of ``--repeat`` calls of:

* first page by id, sorted by CPU descending, sorted by fps descending (max over streams),
  a free-text ``q`` (id, tag or model substring), state=online, a tag filter, page 100
  (offset 4950 by id);
* ``GET /api/v1/fleet`` in-process (FastAPI's ASGI test client: routing, auth, JSON), first
  page by id and sorted by CPU;
* the baseline, ``SELECT count(*) FROM devices`` on the same connection; each call's ratio
  to it says how many count(*)s a page costs on this machine (SQLite counts a table from
  its b-tree pages in tens of microseconds, so its ratios are large).

Each case prints the median and the fastest call (the fastest is the steadier figure on a
shared machine).

Usage: ``.venv/bin/python -m bench.fleet [--devices 10000] [--repeat 30] [--no-pg]``. Prints
a table. Not a test: nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, text

from bench.postgres import fresh_schema
from controller.api import create_app
from controller.db.models import device_streams, device_tags, devices
from controller.db.session import Database
from controller.fleet.listing import fleet_page
from controller.fleet.tokens import create_token

SITES = ("berlin", "paris", "lyon", "oslo", "porto", "riga", "tartu", "graz")
MODELS = ("blazeface@1.0.0", "blazeface@1.1.0", "yolo-n@8.0.1", "ssd-mobilenet@2.3.0")


def populate(db: Database, n: int, seed: int = 7) -> None:
    """``n`` devices with tags, streams and a telemetry summary, in bulk INSERTs."""
    rng = random.Random(seed)
    now = time.time()
    dev_rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    stream_rows: list[dict[str, Any]] = []
    for i in range(n):
        device_id = f"dev-{i:05d}"
        online = rng.random() < 0.9
        reports = rng.random() >= 0.05
        dev_rows.append(
            {
                "id": device_id,
                "first_seen": now - 86400,
                "last_seen": now - rng.uniform(0, 3600),
                "online": online,
                "state": "online" if online else "offline",
                "agent_version": f"0.{rng.randint(1, 9)}.{rng.randint(0, 9)}",
                "facts": {},
                "cpu_percent": round(rng.uniform(1, 100), 1) if reports else None,
                "mem_percent": round(rng.uniform(10, 90), 1) if reports else None,
                "temp_c": round(rng.uniform(35, 85), 1) if reports else None,
            }
        )
        tag_rows += [
            {"device_id": device_id, "tag": f"site:{SITES[i % len(SITES)]}"},
            {"device_id": device_id, "tag": f"rack:{i // 40}"},
            {"device_id": device_id, "tag": "canary" if i % 50 == 0 else "prod"},
        ]
        for s in range(2):
            stream_rows.append(
                {
                    "device_id": device_id,
                    "name": f"cam{s}",
                    "source_state": "running",
                    "active_model": MODELS[(i + s) % len(MODELS)],
                    "installed": [],
                    "phase": "committed",
                    "updated_at": now,
                    "fps": round(rng.uniform(5, 30), 2) if reports else None,
                    "infer_ms_p95": round(rng.uniform(8, 60), 2) if reports else None,
                    "latency_ms_p95": round(rng.uniform(20, 120), 2) if reports else None,
                }
            )
    with db.begin() as conn:
        for table, rows in (
            (devices, dev_rows),
            (device_tags, tag_rows),
            (device_streams, stream_rows),
        ):
            for i in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[i : i + 5000])
    with db.begin() as conn:
        conn.execute(text("ANALYZE"))  # planner statistics, as a long-running database has


def timed_ms(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, fastest) of ``repeat`` calls in ms; the fastest says more on a busy machine."""
    fn()  # warm: statement caches, the page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, min(times) * 1000


CASES: list[tuple[str, dict[str, Any]]] = [
    ("first page by id", {}),
    ("sorted by cpu desc", {"sort": "cpu", "order": "desc"}),
    ("sorted by fps desc", {"sort": "fps", "order": "desc"}),
    ("q=lyon (id/tag/model text)", {"q": "lyon"}),
    ("state=online, by last_seen", {"state": "online", "sort": "last_seen", "order": "desc"}),
    ("tag=canary", {"tags": ["canary"]}),
    ("page 100 by id (offset 4950)", {"offset": 4950}),
]


def run(db_name: str, url: str, n: int, repeat: int) -> list[tuple[str, float, float, float, int]]:
    """(case, median ms, fastest ms, median's ratio to count(*)'s, rows matched) per case."""
    from fastapi.testclient import TestClient

    db = Database.from_url(url)
    try:
        db.upgrade()
        t0 = time.perf_counter()
        populate(db, n)
        print(f"{db_name}: inserted {n} devices in {time.perf_counter() - t0:.1f}s")
        out: list[tuple[str, float, float, float, int]] = []
        with db.connect() as conn:
            base, fast = timed_ms(lambda: _count(conn), repeat)
            out.append(("baseline: SELECT count(*) FROM devices", base, fast, 1.0, _count(conn)))
            for name, kw in CASES:
                ms, fast = timed_ms(functools.partial(fleet_page, conn, **kw), repeat)
                total = fleet_page(conn, **kw).total
                out.append((f"fleet_page: {name}", ms, fast, ms / base, total))
        with db.begin() as conn:
            _, token = create_token(conn, name="bench", role="viewer", now=time.time())
        client = TestClient(create_app(db=db))
        headers = {"Authorization": f"Bearer {token}"}
        for name, params in (("by id", {}), ("by cpu desc", {"sort": "cpu", "order": "desc"})):

            def get(params: dict[str, str] = params) -> None:
                resp = client.get("/api/v1/fleet", params=params, headers=headers)
                resp.raise_for_status()

            ms, fast = timed_ms(get, repeat)
            total = client.get("/api/v1/fleet", params=params, headers=headers).json()["total"]
            out.append((f"GET /api/v1/fleet {name} (in-process)", ms, fast, ms / base, total))
        # The console's fleet page: session lookup, the same fleet_page query, HTML rendering.
        console = TestClient(create_app(db=db), follow_redirects=False)
        login = console.post("/ui/login", data={"token": token})
        assert login.status_code == 303, login.text  # to /ui/fleet, with the session cookie
        for name, query in (("by id", ""), ("by cpu desc", "?sort=cpu&order=desc")):

            def page(query: str = query) -> None:
                resp = console.get(f"/ui/fleet{query}")
                resp.raise_for_status()

            ms, fast = timed_ms(page, repeat)
            out.append((f"GET /ui/fleet {name} (HTML, in-process)", ms, fast, ms / base, 50))
        return out
    finally:
        db.dispose()


def _count(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM devices")).scalar_one())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30, help="calls per case (median)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    results: dict[str, list[tuple[str, float, float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-fleet-") as tmp:
        results["SQLite"] = run(
            "SQLite", f"sqlite:///{Path(tmp) / 'fleet.db'}", args.devices, args.repeat
        )
    if not args.no_pg:
        url, drop = fresh_schema()
        try:
            results["PostgreSQL"] = run("PostgreSQL", url, args.devices, args.repeat)
        finally:
            drop()
    print(
        f"\nfleet page, {args.devices} devices (3 tags, 2 streams each), 50 rows per page, "
        f"median of {args.repeat} calls"
    )
    print(
        f"{'database':<11} {'call':<46} {'median ms':>10} {'min ms':>8} {'x count(*)':>11} "
        f"{'matched':>8}"
    )
    for db_name, rows in results.items():
        for name, ms, fast, ratio, total in rows:
            print(f"{db_name:<11} {name:<46} {ms:10.2f} {fast:8.2f} {ratio:11.1f} {total:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
