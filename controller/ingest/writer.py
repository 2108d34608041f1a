"""The ingestor: decode and queue on the MQTT thread, write in batches on a writer thread.

``Ingestor.handle`` (called on the MQTT network thread) decodes a message, counts every
outcome and puts good messages on a bounded queue; the writer thread flushes the queue to
the database when ``batch_size`` messages are waiting or the oldest is ``flush_interval_s``
old, in one transaction per batch (bulk INSERTs). A batch the database rejects is retried
message by message so one bad message costs only itself; connection errors are retried
with backoff (the queue then fills and back-pressure reaches the broker).

``handle(topic, payload, ack)``: ``ack`` (the MQTT PUBACK of a QoS 1 message) is called
once the message is committed (or refused for good: malformed, ignored, dropped, rejected
by the database), never for a message lost to a crash or a database outage while stopping,
so the broker redelivers those (docs/scaling.md, "Ingestion that survives a replica").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from common.backoff import Backoff
from controller.db.session import Database
from controller.fleet.writes import (
    Received,
    Seen,
    collect,
    touch_devices,
    write_batch,
    write_messages,
)
from controller.ingest.buffer import MessageBuffer
from controller.ingest.decode import RejectedMessage, decode_message, topic_kind
from controller.ingest.rejects import RejectLog
from controller.ingest.stats import IngestSnapshot, IngestStats, Outcome, kind_name

log = logging.getLogger(__name__)

LAST_SEEN_EVERY_S = 1.0
"""Under load (full batches) devices' last_seen is written at most this often."""
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 5.0
"""Delays between tries of a batch while the database is unreachable (doubling, no jitter)."""
_RETRYABLE = (OperationalError, InterfaceError, DisconnectionError)


class _LogLimiter:
    """Log at most ``burst`` warnings per ``period_s``; count the ones left out."""

    def __init__(self, *, burst: int = 10, period_s: float = 10.0) -> None:
        self.burst = burst
        self.period_s = period_s
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start > self.period_s:
            if self._suppressed:
                log.warning("%d more malformed messages were not logged", self._suppressed)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            log.warning(msg, *args)
        else:
            self._suppressed += 1
            log.debug(msg, *args)


class Ingestor:
    """Decode + enqueue (``handle``, called on the MQTT thread) and the batch writer thread."""

    def __init__(
        self,
        *,
        db: Database,
        queue_size: int = 100_000,
        batch_size: int = 2000,
        flush_interval_s: float = 0.1,
        enqueue_timeout_s: float = 2.0,
        stats: IngestStats | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: receipt times (stored); ``monotonic``: the refused-message log's
        once-per-device-per-minute limit."""
        self.db = db
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.enqueue_timeout_s = enqueue_timeout_s
        self.stats = stats or IngestStats()
        self.clock = clock
        self._queue = MessageBuffer(maxsize=queue_size, batch_size=batch_size)
        self._known: set[str] = set()
        self._seen: dict[str, Seen] = {}
        self._touched_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._done = 0
        self._log = _LogLimiter()
        self._rejects = RejectLog(clock=monotonic)
        self._acks: dict[int, Callable[[], None]] = {}
        """id(queued item) → its PUBACK, sent after the item's batch is committed."""

    # called on the MQTT network thread -------------------------------------------------

    def handle(self, topic: str, payload: bytes, ack: Callable[[], None] | None = None) -> Outcome:
        """Decode one message and queue it; never raises (everything is counted). ``ack``
        runs once the message is written or refused for good (see the module doc)."""
        outcome = self._handle(topic, payload, ack)
        if outcome != "queued" and ack is not None:
            _call_ack(ack)
        return outcome

    def _handle(self, topic: str, payload: bytes, ack: Callable[[], None] | None) -> Outcome:
        try:
            decoded = decode_message(topic, payload)
        except RejectedMessage as err:
            self.stats.count("malformed", err.kind, err.reason)
            self._rejects.rejected(err)
            return "malformed"
        except Exception as err:  # noqa: BLE001 - a decoder bug must not stop ingestion
            self.stats.count("malformed", topic_kind(topic), "error")
            self._log.warning("message on %r could not be decoded: %r", topic, err)
            return "malformed"
        if decoded is None:
            self.stats.count("ignored")
            return "ignored"
        device_id, message = decoded
        return self.enqueue(
            Received(topic=topic, device_id=device_id, message=message, received_at=self.clock()),
            ack=ack,
        )

    def enqueue(self, item: Received, *, ack: Callable[[], None] | None = None) -> Outcome:
        """Queue an already decoded message (``handle`` does this after decoding)."""
        if ack is not None:
            self._acks[id(item)] = ack
        if not self._queue.put(item, timeout=self.enqueue_timeout_s):
            self._acks.pop(id(item), None)
            self.stats.count("dropped")
            self._log.warning(
                "ingest queue full for %.1fs: dropped a message on %s; the database is too "
                "slow or unreachable (raise ingest.queue_size or check the database)",
                self.enqueue_timeout_s,
                item.topic,
            )
            return "dropped"
        self.stats.count("queued")
        return "queued"

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def snapshot(self) -> IngestSnapshot:
        return self.stats.snapshot(queue_depth=self.queue_depth)

    # writer ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("ingest writer did not stop within %.0fs", timeout)
            self._thread = None

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message has been written (or rejected)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._done < self.stats.queued:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.1))
        return True

    def write_pending(self) -> int:
        """Write everything queued now, in the caller's thread (tests, tools). Returns the count."""
        total = 0
        while True:
            batch = self._take(block=False)
            if not batch:
                self._flush_seen()
                return total
            self._write(batch)
            total += len(batch)

    def _take(self, *, block: bool) -> list[Received]:
        """Up to batch_size messages: at once if that many wait, else after flush_interval_s."""
        buf = self._queue
        if not block:
            return buf.take(self.batch_size)
        while not len(buf):
            buf.clear_wake()
            if len(buf):
                break
            if self._stop.is_set():
                return []
            buf.wait(0.1)
        deadline = time.monotonic() + self.flush_interval_s
        while len(buf) < self.batch_size and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            buf.clear_wake()
            if len(buf) >= self.batch_size:
                break
            buf.wait(remaining)
        return buf.take(self.batch_size)

    def _run(self) -> None:
        while True:
            batch = self._take(block=True)
            if batch:
                self._write(batch)
            elif self._stop.is_set():
                self._flush_seen()
                return

    def _flush_seen(self) -> None:
        """Write the last_seen updates held back under load."""
        if not self._seen:
            return
        try:
            with self.db.begin() as conn:
                touch_devices(conn, self._seen)
        except Exception as err:  # noqa: BLE001 - last_seen is refreshed by the next batch
            log.warning(
                "could not update last_seen of %d devices: %s", len(self._seen), _short(err)
            )
        else:
            self._seen = {}
            self._touched_at = time.monotonic()

    def _write(self, batch: list[Received]) -> None:
        collected = collect(batch)
        seen = dict(self._seen)
        for device_id, entry in collected.seen.items():
            old = seen.get(device_id)
            seen[device_id] = entry if old is None else old.merge(entry)
        # A partial batch means the queue is drained (light load): touch every time.
        touch = len(batch) < self.batch_size or (
            time.monotonic() - self._touched_at >= LAST_SEEN_EVERY_S
        )
        backoff = Backoff(_RETRY_MIN_S, _RETRY_MAX_S, jitter=0.0)
        while True:
            try:
                with self.db.begin() as conn:
                    write_batch(conn, collected, known=self._known, touch=seen if touch else None)
            except _RETRYABLE as err:
                delay = backoff.next()
                if self._stop.is_set() and delay > 2:
                    log.error(
                        "database unavailable while stopping: %d messages not written (not "
                        "acknowledged: the broker delivers them again)",
                        len(batch),
                    )
                    for item in batch:
                        self._acks.pop(id(item), None)
                    self._finish(len(batch))
                    return
                log.error(
                    "cannot write %d messages to the database (%s); retrying in %.1fs - "
                    "check that the database is reachable",
                    len(batch),
                    getattr(err, "orig", err),
                    delay,
                )
                time.sleep(delay)
                continue
            except Exception as err:  # noqa: BLE001 - fall back to one message per transaction
                log.warning(
                    "the database rejected a batch of %d messages (%s); writing them one by one",
                    len(batch),
                    err.__class__.__name__,
                )
                self._known.clear()
                self._write_one_by_one(batch)
                return
            self._known.update(collected.seen)
            if touch:
                self._seen, self._touched_at = {}, time.monotonic()
            else:
                self._seen = seen
            self.stats.record_batch(batch, committed_at=self.clock(), mono=time.monotonic())
            self._ack(batch)
            self._finish(len(batch))
            return

    def _write_one_by_one(self, batch: list[Received]) -> None:
        for item in batch:
            try:
                with self.db.begin() as conn:
                    write_messages(conn, [item])
            except Exception as err:  # noqa: BLE001 - count it, log the topic, go on
                self.stats.record_rejected(kind_name(item.message))
                self._log.warning(
                    "message on %s rejected by the database: %s", item.topic, _short(err)
                )
            else:
                self.stats.record_batch([item], committed_at=self.clock(), mono=time.monotonic())
            self._ack([item])
            self._finish(1)

    def _ack(self, items: Iterable[Received]) -> None:
        """Acknowledge committed (or for good refused) items to the broker, in order."""
        for item in items:
            ack = self._acks.pop(id(item), None)
            if ack is not None:
                _call_ack(ack)

    def _finish(self, n: int) -> None:
        with self._idle:
            self._done += n
            self._idle.notify_all()


def _call_ack(ack: Callable[[], None]) -> None:
    try:
        ack()
    except Exception as err:  # noqa: BLE001 - a lost PUBACK means a redelivery, not a loss
        log.debug("acknowledging a message failed: %s", err)


def _short(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).splitlines()
    return f"{err.__class__.__name__}: {text[0] if text else ''}"[:300]
