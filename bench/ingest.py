"""Controller ingestion benchmark: batched writer vs. a naive one-commit-per-message writer.

N simulated devices publish telemetry (real protocol messages, QoS 0 as agents send it) through a local
Mosquitto into the controller's MQTT ingestion; messages stored per second are measured
on SQLite (WAL, synchronous=NORMAL) and PostgreSQL, in these runs per database:

* batched, backlog: the broker holds a backlog for the controller's persistent session
  and the controller drains it: its maximum sustained rate (the publisher does not
  compete for the CPU).
* naive, backlog: the same backlog drained by ``on_message`` writing each message in its
  own transaction (same SQL and engine settings, no batching). Time-boxed. On SQLite a
  second naive run uses SQLite's defaults (rollback journal, synchronous=FULL), which is
  what an untuned one-commit-per-message writer gets.
* storage only: the same messages decoded and written without MQTT, batched vs. one
  transaction each (what batching buys on the database side alone).
* batched, live: a publisher process offers ``--live-rate`` messages/s for
  ``--live-seconds``; reports the stored rate and the receipt-to-commit lag.

Usage: ``.venv/bin/python bench/ingest.py [--devices 1000] [--messages 60000] [--no-pg]``.
Prints a table and the ratios batched/naive. Not a test: nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from bench.postgres import fresh_schema
from controller.broker import EmbeddedBroker
from controller.config import IngestConfig
from controller.db.session import Database
from controller.errors import MalformedMessageError
from controller.fleet.history import count_telemetry
from controller.fleet.writes import Received, write_messages
from controller.ingest.decode import INGESTED_KINDS, decode_message
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from tools.simulator.load import publish_load, telemetry_payloads

TELEMETRY_QOS = 0
"""Agents publish telemetry at QoS 0 (docs/protocol.md); the embedded broker queues QoS 0
for the controller's persistent session (queue_qos0_messages), so the backlog runs work."""


@dataclass
class Result:
    db: str
    mode: str
    messages: int
    seconds: float
    lag_p50: float | None = None
    lag_p95: float | None = None
    lag_max: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


class NaiveWriter:
    """The baseline: decode and commit each message on the MQTT thread, one transaction each."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.stored = 0
        self.failed = 0

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            decoded = decode_message(topic, payload)
        except MalformedMessageError:
            self.failed += 1
            return
        if decoded is None:
            return
        device_id, message = decoded
        item = Received(topic=topic, device_id=device_id, message=message, received_at=time.time())
        with self.db.begin() as conn:
            write_messages(conn, [item])
        self.stored += 1


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _settings(broker: EmbeddedBroker, client_id: str) -> MqttSettings:
    return MqttSettings(
        url=broker.url,
        client_id=client_id,
        username=broker.username,
        password=broker.password,
        session_expiry_s=600,
    )


def _backlog(broker: EmbeddedBroker, client_id: str, payloads: list[tuple[str, bytes]]) -> None:
    """Create the persistent session, then publish the backlog while it is offline."""
    sub = MqttSubscriber(
        settings=_settings(broker, client_id), kinds=INGESTED_KINDS, on_message=lambda *_: None
    )
    sub.start()
    sub.stop()
    publish_load(
        broker_url=broker.url,
        payloads=payloads,
        username=broker.username,
        password=broker.password,
        qos=TELEMETRY_QOS,
        client_id=f"pub-{client_id}",
    )


def run_batched_backlog(
    name: str,
    db: Database,
    broker: EmbeddedBroker,
    payloads: list[tuple[str, bytes]],
    args: argparse.Namespace,
) -> Result:
    client_id = f"bench-batched-{uuid.uuid4().hex[:6]}"
    _backlog(broker, client_id, payloads)
    ingestor = Ingestor(db=db, batch_size=args.batch_size, flush_interval_s=args.flush_interval)
    ingestor.start()
    sub = MqttSubscriber(
        settings=_settings(broker, client_id), kinds=INGESTED_KINDS, on_message=ingestor.handle
    )
    t0 = time.monotonic()
    sub.start()
    n = len(payloads)
    done = _wait(lambda: ingestor.stats.stored >= n, timeout=600)
    seconds = time.monotonic() - t0
    sub.stop()
    ingestor.stop()
    snap = ingestor.snapshot()
    if not done:
        print(f"  [{name}] only {snap.stored}/{n} stored", file=sys.stderr)
    return Result(
        name,
        "batched, backlog",
        snap.stored,
        seconds,
        snap.lag_p50_s,
        snap.lag_p95_s,
        snap.lag_max_s,
    )


def run_naive_backlog(
    name: str,
    db: Database,
    broker: EmbeddedBroker,
    payloads: list[tuple[str, bytes]],
    args: argparse.Namespace,
) -> Result:
    client_id = f"bench-naive-{uuid.uuid4().hex[:6]}"
    _backlog(broker, client_id, payloads)
    naive = NaiveWriter(db)
    sub = MqttSubscriber(
        settings=_settings(broker, client_id), kinds=INGESTED_KINDS, on_message=naive.handle
    )
    t0 = time.monotonic()
    sub.start()
    _wait(lambda: naive.stored >= len(payloads), timeout=args.naive_seconds)
    stored, seconds = naive.stored, time.monotonic() - t0
    sub.stop()
    return Result(name, "naive, backlog", stored, seconds)


def _publisher(
    url: str,
    user: str,
    password: str,
    devices: list[str],
    per_device: int,
    rate: float,
    achieved: Any,
) -> None:
    payloads = telemetry_payloads(devices, per_device=per_device, seed=7)
    result = publish_load(
        broker_url=url,
        payloads=payloads,
        username=user,
        password=password,
        qos=TELEMETRY_QOS,
        rate=rate,
        client_id="pub-live",
    )
    achieved.value = result.rate


def run_batched_live(
    name: str, db: Database, broker: EmbeddedBroker, devices: list[str], args: argparse.Namespace
) -> Result:
    ingestor = Ingestor(db=db, batch_size=args.batch_size, flush_interval_s=args.flush_interval)
    ingestor.start()
    sub = MqttSubscriber(
        settings=_settings(broker, f"bench-live-{uuid.uuid4().hex[:6]}"),
        kinds=INGESTED_KINDS,
        on_message=ingestor.handle,
    )
    sub.start()
    per_device = max(1, round(args.live_rate * args.live_seconds / len(devices)))
    total = per_device * len(devices)
    ctx = multiprocessing.get_context("spawn")
    achieved = ctx.Value("d", 0.0)
    proc = ctx.Process(
        target=_publisher,
        args=(
            broker.url,
            broker.username,
            broker.password,
            devices,
            per_device,
            args.live_rate,
            achieved,
        ),
    )
    proc.start()
    _wait(lambda: ingestor.stats.received > 0, timeout=60)
    t0 = time.monotonic()
    first = ingestor.stats.stored
    _wait(lambda: ingestor.stats.stored >= total, timeout=args.live_seconds * 5 + 60)
    seconds = time.monotonic() - t0
    proc.join(60)
    sub.stop()
    ingestor.stop()
    snap = ingestor.snapshot()
    return Result(
        name,
        f"batched, live ({args.live_rate:.0f}/s asked, {achieved.value:.0f}/s sent)",
        snap.stored - first,
        seconds,
        snap.lag_p50_s,
        snap.lag_p95_s,
        snap.lag_max_s,
    )


def run_storage(
    name: str,
    db: Database,
    payloads: list[tuple[str, bytes]],
    args: argparse.Namespace,
    *,
    naive: bool,
) -> Result:
    """The database side alone: decoded messages written by the batch writer or one by one."""
    if naive:
        writer = NaiveWriter(db)
        t0 = time.monotonic()
        for topic, payload in payloads:
            writer.handle(topic, payload)
            if time.monotonic() - t0 > args.naive_seconds:
                break
        return Result(name, "naive, storage only (no MQTT)", writer.stored, time.monotonic() - t0)
    ingestor = Ingestor(
        db=db, queue_size=len(payloads) + 1, batch_size=args.batch_size, flush_interval_s=1
    )
    t0 = time.monotonic()
    for topic, payload in payloads:
        ingestor.handle(topic, payload)
    ingestor.write_pending()
    return Result(
        name, "batched, storage only (no MQTT)", ingestor.stats.stored, time.monotonic() - t0
    )


def bench_database(
    name: str,
    make_url: Callable[[], tuple[str, Callable[[], None]]],
    broker: EmbeddedBroker,
    args: argparse.Namespace,
) -> list[Result]:
    devices = [f"dev-{i:05d}" for i in range(args.devices)]
    per_device = max(1, args.messages // args.devices)
    payloads = telemetry_payloads(devices, per_device=per_device)
    naive_payloads = payloads[: args.naive_messages]
    results = []
    runners = ["batched", "naive"]
    if name == "sqlite":
        runners.append("naive-defaults")
    runners += ["storage-batched", "storage-naive"]
    if args.live_rate > 0:
        runners.append("live")
    for runner in runners:
        url, cleanup = make_url()
        # naive-defaults: what a naive writer gets without tuning (rollback journal,
        # synchronous=FULL); the others use make_engine (WAL, synchronous=NORMAL).
        db = Database(create_engine(url)) if runner == "naive-defaults" else Database.from_url(url)
        db.upgrade()
        try:
            if runner == "batched":
                results.append(run_batched_backlog(name, db, broker, payloads, args))
            elif runner == "naive":
                results.append(run_naive_backlog(name, db, broker, naive_payloads, args))
            elif runner == "naive-defaults":
                result = run_naive_backlog(name, db, broker, naive_payloads, args)
                result.mode = "naive, SQLite defaults"
                results.append(result)
            elif runner == "storage-batched":
                results.append(run_storage(name, db, payloads, args, naive=False))
            elif runner == "storage-naive":
                results.append(run_storage(name, db, naive_payloads, args, naive=True))
            else:
                results.append(run_batched_live(name, db, broker, devices, args))
            with db.connect() as conn:
                rows = count_telemetry(conn)
            print(f"  [{name}] {runner}: {rows} telemetry rows in the database", file=sys.stderr)
        finally:
            db.dispose()
            cleanup()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=60_000, help="backlog size (batched)")
    parser.add_argument("--naive-messages", type=int, default=20_000, help="backlog size (naive)")
    parser.add_argument(
        "--naive-seconds", type=float, default=20.0, help="time box of the naive run"
    )
    parser.add_argument(
        "--live-rate", type=float, default=10_000, help="offered messages/s (0: skip)"
    )
    parser.add_argument("--live-seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=IngestConfig().batch_size)
    parser.add_argument("--flush-interval", type=float, default=IngestConfig().flush_interval_s)
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        broker = EmbeddedBroker(workdir=Path(tmp) / "broker", port=0)
        broker.start()
        try:
            counter = iter(range(1_000_000))

            def sqlite_url() -> tuple[str, Callable[[], None]]:
                return f"sqlite:///{tmp}/bench-{next(counter)}.db", lambda: None

            results = bench_database("sqlite", sqlite_url, broker, args)
            if not args.no_pg:
                results += bench_database("postgresql", fresh_schema, broker, args)
        finally:
            broker.stop()

    print(
        f"\ncontroller ingestion: {args.devices} devices, telemetry QoS {TELEMETRY_QOS}, batch {args.batch_size} / {args.flush_interval}s"
    )
    print(
        f"{'database':<11} {'writer':<40} {'messages':>9} {'seconds':>8} {'msg/s':>9} {'lag p50':>8} {'lag p95':>8} {'lag max':>8}"
    )

    def ms(v: float | None) -> str:
        return f"{v * 1000:.0f}ms" if v is not None else "-"

    for r in results:
        print(
            f"{r.db:<11} {r.mode:<40} {r.messages:>9} {r.seconds:>8.2f} {r.rate:>9.0f} "
            f"{ms(r.lag_p50):>8} {ms(r.lag_p95):>8} {ms(r.lag_max):>8}"
        )
    print()
    for db_name in ("sqlite", "postgresql"):
        batched = next(
            (r for r in results if r.db == db_name and r.mode == "batched, backlog"), None
        )
        naive = next((r for r in results if r.db == db_name and r.mode == "naive, backlog"), None)
        if batched and naive and naive.rate:
            print(
                f"{db_name}: batched / naive (same engine settings) = {batched.rate / naive.rate:.1f}x"
            )
        plain = next(
            (r for r in results if r.db == db_name and r.mode == "naive, SQLite defaults"), None
        )
        if batched and plain and plain.rate:
            print(
                f"{db_name}: batched / naive with SQLite defaults = {batched.rate / plain.rate:.1f}x"
            )
        stored = [r for r in results if r.db == db_name and "storage only" in r.mode]
        if len(stored) == 2 and stored[1].rate:
            print(
                f"{db_name}: storage only (decode + write, no MQTT): batched / naive = "
                f"{stored[0].rate / stored[1].rate:.1f}x"
            )
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks (broker)
    sys.exit(main())
