"""The CPU cost of publishing a detections message at camera rates, through the agent's real
``Publisher`` and a real Mosquitto: the producer hands the message to paho itself where
nothing is ahead of it (``Sender.send_now``) against the queued path through the publisher
thread (the agent before that change), in the same process, rounds interleaved.

N producer threads (``--streams``) each publish one message per 1/15 s, spread evenly; the
process's CPU time per message (``/proc/self/task/*/schedstat``, nanoseconds, every thread:
producers, the publisher thread, paho's network thread) is measured over ``--seconds`` per
round. The producers' own pacing (a sleep per message) is in both columns. "handed": the
share of the messages their producer handed to paho itself.

Run: ``.venv/bin/python -m bench.publish`` (about 2 minutes; ``--streams``, ``--rounds``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from agent.config import BrokerConfig
from agent.outbox import OutMessage
from agent.publisher import Publisher
from agent.sender import Sender
from agent.spool.queue import Spool
from bench.procstat import process_cpu_s
from tests.broker import Mosquitto

FPS = 15.0
PAYLOAD = (
    b'{"schema":1,"device_id":"bench","stream":"cam0","seq":1,"frame_ts":1.0,'
    b'"frame_index":1,"model":"blazeface@1","infer_ms":2.0,"width":640,"height":480,'
    b'"detections":[{"label":"face","score":0.9,"box":[0.1,0.2,0.3,0.4]}]}'
)


@contextmanager
def queued_only(queued: bool) -> Iterator[None]:
    """The agent before ``send_now``: every message goes through the publisher thread."""
    original = Sender.send_now
    if queued:

        def never(self: Sender, msg: OutMessage) -> bool:
            return False

        Sender.send_now = never  # type: ignore[method-assign]
    try:
        yield
    finally:
        Sender.send_now = original  # type: ignore[method-assign]


def one_round(port: int, spool_dir: Path, streams: int, seconds: float) -> tuple[float, float]:
    """(CPU microseconds per message, share of the messages their producer handed to paho)
    of one round."""
    publisher = Publisher(
        device_id="bench",
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{port}"),
        spool=Spool(spool_dir, max_bytes=1 << 20),
        will_payload=b'{"state":"offline"}',
    )
    publisher.start()
    deadline = time.monotonic() + 10
    while not publisher.connected:
        if time.monotonic() > deadline:
            raise SystemExit(f"the publisher could not connect to 127.0.0.1:{port}")
        time.sleep(0.05)
    stop = threading.Event()
    sent = [0] * streams

    def produce(n: int) -> None:
        topic = f"edgefleet/v1/bench/detections/cam{n}"
        due = time.monotonic() + n / (FPS * streams)
        while not stop.is_set():
            due += 1 / FPS
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            publisher.publish_detections(topic, PAYLOAD)
            sent[n] += 1

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(streams)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # connected, settled, producers on their schedule
        cpu0, n0 = process_cpu_s(), sum(sent)
        time.sleep(seconds)
        cpu1, n1 = process_cpu_s(), sum(sent)
    finally:
        stop.set()
        for t in threads:
            t.join()
        direct = publisher._sender.sent_now / max(1, sum(sent))
        publisher.close()
    return (cpu1 - cpu0) / max(1, n1 - n0) * 1e6, direct


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (interleaved)")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; {args.seconds:g} s per round, {args.rounds} rounds per mode")
    print(f"{'streams':>7} {'direct us/msg':>13} {'queued us/msg':>13} {'ratio':>6} {'handed':>7}")
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        for streams in args.streams:
            cost: dict[bool, list[float]] = {False: [], True: []}
            handed: list[float] = []
            for r in range(args.rounds):
                for queued in (False, True) if r % 2 == 0 else (True, False):
                    with queued_only(queued):
                        spool = Path(tmp) / f"spool-{streams}-{r}-{queued}"
                        us, direct_share = one_round(broker.port, spool, streams, args.seconds)
                    cost[queued].append(us)
                    if not queued:
                        handed.append(direct_share)
            direct, queued_cost = statistics.median(cost[False]), statistics.median(cost[True])
            print(
                f"{streams:7d} {direct:13.0f} {queued_cost:13.0f} {direct / queued_cost:6.2f} "
                f"{statistics.median(handed):7.0%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
