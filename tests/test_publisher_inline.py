"""Messages at camera rates are handed to paho by their producer, without waking the
publisher thread, and keep their order (real Mosquitto).

Publishing a detections message cost about 0.8-0.9 ms of CPU on a 2-core machine, the
publisher thread's wake-up and pass 240-280 us of it; handing it over on the producer's
thread cost 0.77-0.84x (bench/publish.py, docs/performance.md).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.mqtt_client import PublishResult
from agent.publisher import Publisher
from protocol import detections_topic
from tests.broker import Mosquitto
from tests.mqtt_sub import Subscriber
from tests.test_publisher import DEVICE, make_publisher, runs, seq_payload
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

CAMERA_GAP_S = 0.03
"""Further apart than the publisher's linger (5 ms): a camera's rate, not a burst."""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


def _wake_ups(publisher: Publisher) -> int:
    """The publisher thread's voluntary context switches (each one a sleep it woke from)."""
    thread = publisher._sender._thread
    assert thread is not None and thread.native_id is not None
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])


def _connected(publisher: Publisher) -> None:
    publisher.start()
    wait_for(lambda: publisher.connected, timeout=10, what="the publisher to connect")
    time.sleep(0.3)  # the publisher thread settles the new connection (retained status)


def _received_in_order(sub: Subscriber, topic: str, count: int) -> None:
    sub.wait_for(lambda ms: sum(m.topic == topic for m in ms) >= count, timeout=20)
    payloads = sub.payloads(topic)
    assert payloads == [seq_payload(i) for i in range(count)], runs(payloads)


@contextmanager
def _rig(
    broker: Mosquitto, tmp_path: Path, topics: list[str], **kw: object
) -> Iterator[tuple[Subscriber, Publisher]]:
    """A subscriber (persistent session) on ``topics`` and a connected, settled publisher;
    both closed afterwards."""
    sub = Subscriber(broker.port, topics)
    publisher = make_publisher(broker.url, tmp_path / "spool", **kw)
    try:
        _connected(publisher)
        yield sub, publisher
    finally:
        publisher.close()
        sub.close()


def test_camera_rate_messages_do_not_wake_the_publisher_thread(
    broker: Mosquitto, tmp_path: Path
) -> None:
    topic = detections_topic(DEVICE, "cam")
    with _rig(broker, tmp_path, [topic]) as (sub, publisher):
        before = _wake_ups(publisher)
        started = time.monotonic()
        for i in range(40):
            publisher.publish_detections(topic, seq_payload(i))
            time.sleep(CAMERA_GAP_S)
        elapsed = time.monotonic() - started
        _received_in_order(sub, topic, 40)
        wake_ups = _wake_ups(publisher) - before
        # Its own beat (every 0.25 s; waits for the interpreter lock count too) and a few
        # more; at least one per message before (50 for these 40).
        assert wake_ups <= max(20.0, elapsed / 0.25 * 3), wake_ups
        # A message that meets the publisher thread's pass is queued (a loaded machine).
        assert publisher._sender.sent_now >= 25
        wait_for(lambda: publisher.in_flight == 0, timeout=5, what="acknowledgements")
        assert publisher.published >= 40


def test_four_producers_keep_each_streams_order(broker: Mosquitto, tmp_path: Path) -> None:
    topics = [detections_topic(DEVICE, f"cam{n}") for n in range(4)]
    with _rig(broker, tmp_path, [topics[0].rsplit("/", 1)[0] + "/+"]) as (sub, publisher):

        def stream(topic: str, offset: float) -> None:
            time.sleep(offset)
            for i in range(30):
                publisher.publish_detections(topic, seq_payload(i))
                time.sleep(CAMERA_GAP_S)

        threads = [
            threading.Thread(target=stream, args=(t, n * CAMERA_GAP_S / 4))
            for n, t in enumerate(topics)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for topic in topics:
            _received_in_order(sub, topic, 30)
        # Most went straight to paho; some met another producer in the window lock.
        assert publisher._sender.sent_now >= 40


def test_a_burst_is_queued_and_batched(broker: Mosquitto, tmp_path: Path) -> None:
    topic = detections_topic(DEVICE, "cam")
    with _rig(broker, tmp_path, [topic]) as (sub, publisher):
        for i in range(300):
            publisher.publish_detections(topic, seq_payload(i))
        _received_in_order(sub, topic, 300)
        # Only the burst's first message may go straight (nothing before it was recent).
        assert publisher._sender.sent_now <= 2


def test_a_full_window_queues_behind_it_and_keeps_the_order(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The broker stops acknowledging (paused): with one message allowed in flight, the
    messages after the first are queued, never handed over ahead of their turn."""
    topic = detections_topic(DEVICE, "cam")
    assert broker.proc is not None
    with _rig(broker, tmp_path, [topic], max_inflight=1) as (sub, publisher):
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(10):
                publisher.publish_detections(topic, seq_payload(i))
                time.sleep(CAMERA_GAP_S)
            assert publisher._sender.sent_now == 1
            assert publisher.in_flight == 1
            assert publisher.queued == 10
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        _received_in_order(sub, topic, 10)
        wait_for(lambda: publisher.queued == 0, timeout=5, what="the last acknowledgement")
        for i in range(10, 20):  # the queue drained: straight to paho again
            publisher.publish_detections(topic, seq_payload(i))
            time.sleep(0.05)
        _received_in_order(sub, topic, 20)
        # An acknowledgement later than the next message queues that one (and drains).
        assert publisher._sender.sent_now >= 3


def test_messages_after_an_outage_wait_for_the_spool(broker: Mosquitto, tmp_path: Path) -> None:
    """Spooled messages go first after a reconnect; new ones are not handed over ahead (the
    subscriber's persistent session gets what it missed)."""
    topic = detections_topic(DEVICE, "cam")
    with _rig(broker, tmp_path, [topic]) as (sub, publisher):
        for i in range(5):
            publisher.publish_detections(topic, seq_payload(i))
            time.sleep(CAMERA_GAP_S)
        _received_in_order(sub, topic, 5)
        broker.stop()
        wait_for(lambda: not publisher.connected, timeout=10, what="the loss to be seen")
        for i in range(5, 200):
            publisher.publish_detections(topic, seq_payload(i))
        wait_for(lambda: publisher.spool_depth > 0, timeout=5, what="messages to be spooled")
        broker.start()
        for i in range(200, 260):  # while the spool replays
            publisher.publish_detections(topic, seq_payload(i))
            time.sleep(0.01)
        _received_in_order(sub, topic, 260)


def test_a_failing_hand_over_is_queued_not_raised(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault injected into paho's publish on the producer's thread: the producer (a stream's
    inference thread) does not see it, and the message goes out through the queue, in order."""
    topic = detections_topic(DEVICE, "cam")
    with _rig(broker, tmp_path, [topic]) as (sub, publisher):
        conn = publisher._conn
        real = conn.publish
        failures = [1]

        def flaky(topic: str, payload: bytes, *, qos: int, retain: bool) -> PublishResult:
            if failures and threading.current_thread() is threading.main_thread():
                failures.pop()
                raise RuntimeError("injected")
            return real(topic, payload, qos=qos, retain=retain)

        conn.publish = flaky  # type: ignore[method-assign]
        for i in range(10):
            publisher.publish_detections(topic, seq_payload(i))
            time.sleep(CAMERA_GAP_S)
        _received_in_order(sub, topic, 10)
        assert not failures
        assert "handing a message to paho failed" in caplog.text
