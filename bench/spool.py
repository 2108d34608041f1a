"""Spool benchmark: the agent's segment spool vs an SQLite one, on the publisher's workload.

Both implementations (:class:`agent.spool.queue.Spool` and
:class:`bench.spool_sqlite.SqliteSpool`) run in this process, in fresh folders under one
temporary folder (one filesystem), alternately (ABAB...) so machine noise hits them alike;
each number is the median over the rounds. Two workloads, each with the same operations for
both (a seeded random sequence):

- ``steady``: the spool while the connection flaps: producers spill bursts
  (``append_many`` of 1..16 real ``Detections`` payloads, ~340-810 bytes, on
  ``edgefleet/v1/dev-1/detections/camN``) and the sender thread, as ``agent.sender`` does,
  keeps up to 100 records in flight (``head_index``, ``peek(room, skip=in flight)``) and
  retires a random oldest part of them per pass with ``ack_through``.
- ``outage``: the broker is away: 50k records are spilled (fill), then the sender replays
  them (drain) as above.

``sync_if_due`` runs after every step with a clock that advances 1 ms per message appended or
acknowledged: one fsync round per 1000 messages, i.e. per second at the 1000 msg/s an agent
can produce, whatever the speed of the implementation. Printed: messages/s (medians), the
ratio sqlite/segments, bytes on disk after the fill and after close, and bytes the process
handed to ``write(2)`` and dirtied for the disk per message (``/proc/self/io``).
Run: ``.venv/bin/python -m bench.spool`` (``--quick``: a few seconds).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.spool.queue import Spool
from bench.spool_sqlite import SqliteSpool
from protocol.messages import Detection, Detections, encode
from protocol.topics import detections_topic

AnySpool = Spool | SqliteSpool
IMPLS: dict[str, Callable[..., AnySpool]] = {"segments": Spool, "sqlite": SqliteSpool}
MAX_BYTES = 64 << 20
"""The agent's default ``[spool] max_bytes``."""
WINDOW = 100
"""The publisher's default ``max_inflight``."""
RATE = 1000.0
"""Messages per simulated second: ``sync_if_due`` fires once per RATE messages."""
POOL = 4096
Message = tuple[str, bytes, int]


def payloads(seed: int = 1) -> list[Message]:
    """Real ``Detections`` messages of 2..8 boxes on 4 streams (~340-810 bytes)."""
    rng = random.Random(seed)
    out: list[Message] = []
    for seq in range(POOL):
        stream = f"cam{seq % 4}"
        boxes = []
        for _ in range(rng.randint(2, 8)):
            x, y = rng.random() * 0.8, rng.random() * 0.8
            boxes.append(
                Detection(
                    label=rng.choice(("face", "person", "car")),
                    score=round(rng.uniform(0.5, 1.0), 4),
                    box=(round(x, 4), round(y, 4), round(x + 0.1, 4), round(y + 0.15, 4)),
                )
            )
        msg = Detections(
            schema=1,
            device_id="dev-1",
            stream=stream,
            seq=100_000 + seq,
            frame_ts=1_765_000_000.0 + seq / 30,
            frame_index=seq // 4,
            model="blazeface-short-int8@1.4.2",
            infer_ms=round(rng.uniform(2.0, 9.0), 3),
            width=640,
            height=480,
            detections=boxes,
        )
        out.append((detections_topic("dev-1", stream), encode(msg), 1))
    return out + out[:16]  # a burst starting near the end wraps around


@dataclass
class Clock:
    """Simulated time: 1/RATE s per message, so syncs come per 1000 messages."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, messages: int) -> None:
        self.now += messages / RATE


class Sender:
    """What ``agent.sender.Sender`` does with the spool, minus the network."""

    def __init__(self, spool: AnySpool, clock: Clock, rng: random.Random) -> None:
        self.spool = spool
        self.clock = clock
        self.rng = rng
        self.inflight: deque[int] = deque()
        self.delivered = 0

    def one_pass(self) -> None:
        spool = self.spool
        # settle: the broker acknowledged the oldest part of the window, in order
        done = self.rng.randint(0, len(self.inflight))
        if done:
            upto = 0
            for _ in range(done):
                upto = self.inflight.popleft()
            spool.ack_through(upto)
            self.delivered += done
            self.clock.tick(done)
        # fill: hand spooled records to paho up to the in-flight limit
        room = WINDOW - len(self.inflight)
        if room > 0 and spool.depth:
            head = spool.head_index
            skip = sum(1 for i in self.inflight if i >= head)
            for rec in spool.peek(room, skip=skip):
                self.inflight.append(rec.index)
                assert rec.payload  # paho would copy it into a PUBLISH packet
        spool.sync_if_due()


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def proc_io() -> tuple[int, int]:
    """(bytes handed to write(2), bytes dirtied for the disk) by this process so far."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["wchar"]), int(fields["write_bytes"])


@dataclass
class Result:
    rate: float
    """Messages per second (appended, or delivered for the drain)."""
    wchar: float
    """Bytes passed to write(2) per message."""
    dirtied: float
    """Bytes dirtied for the disk per message."""
    disk_full: int = 0
    """Bytes on disk with the outage's records spooled."""
    disk_drained: int = 0
    """Bytes on disk once the outage was drained (spool still open)."""
    disk_closed: int = 0
    """Bytes on disk after the drain and close."""


def bursts(pool: list[Message], n: int, rng: random.Random) -> Iterator[list[Message]]:
    """``n`` messages taken round the pool in bursts of 1..16, as inference produces them."""
    taken = 0
    while taken < n:
        size = min(rng.randint(1, 16), n - taken)
        yield [pool[(taken + i) % len(pool)] for i in range(size)]
        taken += size


def steady(make: Callable[..., AnySpool], folder: Path, pool: list[Message], n: int) -> Result:
    rng = random.Random(7)
    clock = Clock()
    spool = make(folder, max_bytes=MAX_BYTES, clock=clock)
    sender = Sender(spool, clock, random.Random(8))
    w0, d0 = proc_io()
    t0 = time.perf_counter()
    appended = 0
    for burst in bursts(pool, n, rng):
        spool.append_many(burst)
        appended += len(burst)
        clock.tick(len(burst))
        sender.one_pass()
    while spool.depth:
        sender.one_pass()
    spool.close()
    elapsed = time.perf_counter() - t0
    w1, d1 = proc_io()
    assert sender.delivered == appended, (sender.delivered, appended)
    return Result(appended / elapsed, (w1 - w0) / appended, (d1 - d0) / appended)


def outage(
    make: Callable[..., AnySpool], folder: Path, pool: list[Message], n: int
) -> tuple[Result, Result]:
    """(fill, drain) of an outage of ``n`` messages."""
    rng = random.Random(9)
    clock = Clock()
    spool = make(folder, max_bytes=MAX_BYTES, clock=clock)
    w0, d0 = proc_io()
    t0 = time.perf_counter()
    appended = 0
    for burst in bursts(pool, n, rng):
        spool.append_many(burst)
        appended += len(burst)
        clock.tick(len(burst))
        spool.sync_if_due()
    t1 = time.perf_counter()
    w1, d1 = proc_io()
    full = disk_bytes(folder)
    sender = Sender(spool, clock, random.Random(10))
    while spool.depth:
        sender.one_pass()
    spool.sync()  # what the next sync_if_due, within a second, does
    t2 = time.perf_counter()
    w2, d2 = proc_io()
    drained = disk_bytes(folder)
    spool.close()
    assert sender.delivered == appended, (sender.delivered, appended)
    fill = Result(appended / (t1 - t0), (w1 - w0) / appended, (d1 - d0) / appended, full)
    drain = Result(
        appended / (t2 - t1),
        (w2 - w1) / appended,
        (d2 - d1) / appended,
        full,
        drained,
        disk_bytes(folder),
    )
    return fill, drain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steady", type=int, default=100_000, help="messages per steady run")
    parser.add_argument("--outage", type=int, default=50_000, help="messages per outage")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the spool folders")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, 10k steady messages, 20k outage"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steady, args.outage = 3, 10_000, 20_000
    pool = payloads()
    sizes = sorted(len(p) for _, p, _ in pool[:POOL])
    results: dict[str, dict[str, list[Result]]] = {
        name: {"steady": [], "fill": [], "drain": []} for name in IMPLS
    }
    with tempfile.TemporaryDirectory(prefix="bench-spool-", dir=args.dir) as tmp:
        print(
            f"spool bench in {tmp}: {args.rounds} rounds (ABAB), steady {args.steady} msgs, "
            f"outage {args.outage} msgs; payloads {sizes[0]}..{sizes[-1]} bytes "
            f"(median {statistics.median(sizes):.0f}); sync_if_due per {RATE:.0f} msgs"
        )
        for r in range(args.rounds):
            for name, make in IMPLS.items():
                gc.collect()
                results[name]["steady"].append(
                    steady(make, Path(tmp) / f"{name}-steady-{r}", pool, args.steady)
                )
                gc.collect()
                fill, drain = outage(make, Path(tmp) / f"{name}-outage-{r}", pool, args.outage)
                results[name]["fill"].append(fill)
                results[name]["drain"].append(drain)
    report(results)


def report(results: dict[str, dict[str, list[Result]]]) -> None:
    def med(name: str, phase: str, attr: str) -> float:
        return float(statistics.median(getattr(x, attr) for x in results[name][phase]))

    print(f"\n{'msgs/s (median)':18}{'segments':>12}{'sqlite':>12}{'sqlite/seg':>12}   rounds")
    for phase in ("steady", "fill", "drain"):
        a, b = med("segments", phase, "rate"), med("sqlite", phase, "rate")
        each = " ".join(
            f"{y.rate / x.rate:.2f}"
            for x, y in zip(results["segments"][phase], results["sqlite"][phase], strict=True)
        )
        print(f"{phase:18}{a:12.0f}{b:12.0f}{b / a:12.2f}   {each}")
    print(f"\n{'per message':18}{'segments':>12}{'sqlite':>12}{'sqlite/seg':>12}")
    for phase in ("steady", "fill", "drain"):
        for attr, label in (("wchar", "write(2) B"), ("dirtied", "dirtied B")):
            a, b = med("segments", phase, attr), med("sqlite", phase, attr)
            ratio = f"{b / a:12.2f}" if a >= 10 else f"{'-':>12}"
            print(f"{phase + ' ' + label:18}{a:12.0f}{b:12.0f}{ratio}")
    print(f"\n{'on disk (bytes)':18}{'segments':>12}{'sqlite':>12}{'sqlite/seg':>12}")
    for attr, label in (
        ("disk_full", "outage spooled"),
        ("disk_drained", "drained, open"),
        ("disk_closed", "closed"),
    ):
        a, b = med("segments", "drain", attr), med("sqlite", "drain", attr)
        ratio = f"{b / a:12.2f}" if a >= 4096 else f"{'-':>12}"
        print(f"{label:18}{a:12.0f}{b:12.0f}{ratio}")


if __name__ == "__main__":
    main()
