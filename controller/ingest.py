"""MQTT ingestion: decode on the MQTT thread, write in batches on a writer thread.

``decode_message`` turns a topic and payload into a storable message or raises
MalformedMessageError; ``Ingestor.handle`` counts every outcome and puts good messages
on a bounded queue; the writer thread flushes the queue to the database when
``batch_size`` messages are waiting or the oldest is ``flush_interval_s`` old, in one
transaction per batch (bulk INSERTs). A batch the database rejects is retried message by
message so one bad message costs only itself; connection errors are retried with backoff
(the queue then fills and back-pressure reaches the broker).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from controller.db.models import CODE_LEN, MODEL_LEN, VERSION_LEN
from controller.db.session import Database
from controller.errors import MalformedMessageError
from controller.store import (
    Message,
    Received,
    Seen,
    collect,
    touch_devices,
    write_batch,
    write_messages,
)
from protocol import (
    MESSAGE_TYPES,
    Event,
    Kind,
    ProtocolError,
    Reported,
    Status,
    Telemetry,
    decode,
    parse_topic,
    validate_stream_name,
)

log = logging.getLogger(__name__)

INGESTED_KINDS: tuple[Kind, ...] = (Kind.STATUS, Kind.TELEMETRY, Kind.REPORTED, Kind.EVENTS)
"""The topic kinds the controller subscribes to and stores."""
RETAINED_KINDS = frozenset({Kind.STATUS, Kind.REPORTED})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_LAG_SAMPLES = 20_000
LAST_SEEN_EVERY_S = 1.0
"""Under load (full batches) devices' last_seen is written at most this often."""

Outcome = Literal["queued", "malformed", "ignored", "dropped"]


# --- decoding ---------------------------------------------------------------------------


def _fail(topic: str, why: str) -> MalformedMessageError:
    return MalformedMessageError(f"{topic}: {why}")


def _check_len(topic: str, name: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise _fail(topic, f"{name} is longer than {limit} characters")


def _check_int(topic: str, name: str, value: int | None) -> None:
    if value is not None and not _INT64_MIN <= value <= _INT64_MAX:
        raise _fail(topic, f"{name} {value} does not fit in a signed 64-bit integer")


def _check_stream(topic: str, name: str | None) -> None:
    if name is not None:
        try:
            validate_stream_name(name)
        except ProtocolError as err:
            raise _fail(topic, str(err)) from err


def _contains_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, (list, tuple)):
        return any(_contains_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    fields = getattr(value, "__struct_fields__", None)
    if fields is not None:
        return any(_contains_nul(getattr(value, f)) for f in fields)
    return False


def _check_storable(topic: str, message: Message) -> None:
    """Limits the database enforces (lengths, 64-bit integers) checked before the write."""
    if isinstance(message, Telemetry):
        for name in ("mem_used_bytes", "disk_free_bytes", "spool_depth", "spool_dropped"):
            _check_int(topic, name, getattr(message, name))
        for s in message.streams:
            _check_stream(topic, s.name)
    elif isinstance(message, Status):
        _check_len(topic, "agent_version", message.agent_version, VERSION_LEN)
        for st in message.streams:
            _check_stream(topic, st.name)
            _check_len(topic, f"streams[{st.name}].model", st.model, MODEL_LEN)
    elif isinstance(message, Reported):
        _check_int(topic, "desired_rev", message.desired_rev)
        for name, rep in message.streams.items():
            _check_stream(topic, name)
            for key in ("active", "previous", "target"):
                _check_len(topic, f"streams[{name}].{key}", getattr(rep, key), MODEL_LEN)
    else:
        _check_len(topic, "code", message.code, CODE_LEN)
        _check_stream(topic, message.stream)
        for key, value in message.details.items():
            if isinstance(value, int) and not isinstance(value, bool):
                _check_int(topic, f"details.{key}", value)


def decode_message(topic: str, payload: bytes) -> tuple[str, Message] | None:
    """Decode one MQTT message into (device_id, message).

    Returns None for messages that are fine but carry nothing to store (an empty payload
    clearing a retained status/reported topic); raises MalformedMessageError naming the
    topic and the problem for everything else that does not follow the protocol.
    """
    try:
        parsed = parse_topic(topic)
    except ProtocolError as err:
        raise _fail(topic, str(err)) from err
    if parsed.kind not in INGESTED_KINDS:
        raise _fail(topic, f"the controller does not ingest {parsed.kind.value} messages")
    if not payload:
        if parsed.kind in RETAINED_KINDS:
            return None
        raise _fail(topic, "empty payload")
    try:
        message: Message = decode(payload, MESSAGE_TYPES[parsed.kind.value])  # type: ignore[assignment]
    except ProtocolError as err:
        raise _fail(topic, str(err)) from err
    if message.device_id != parsed.device_id:
        raise _fail(
            topic, f"payload device_id {message.device_id!r} does not match the topic's device id"
        )
    if b"\\u0000" in payload and _contains_nul(message):
        raise _fail(topic, "a string contains a NUL character")
    _check_storable(topic, message)
    return parsed.device_id, message


# --- statistics -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestSnapshot:
    received: int
    queued: int
    malformed: int
    ignored: int
    dropped: int
    stored: int
    rejected: int
    batches: int
    stored_by_kind: dict[str, int]
    malformed_by_kind: dict[str, int]
    queue_depth: int
    rate_per_s: float
    """Messages stored per second over the last ``rate_window_s``."""
    lag_p50_s: float | None
    """Receipt-to-commit time of recently stored messages."""
    lag_p95_s: float | None
    lag_max_s: float | None
    last_batch_lag_s: float | None
    """Receipt-to-commit time of the oldest message of the last batch."""
    mqtt_connected: bool


@dataclass(slots=True)
class IngestStats:
    """Thread-safe counters of the ingestion path (read by /metrics, tests and benchmarks)."""

    rate_window_s: float = 10.0
    received: int = 0
    queued: int = 0
    malformed: int = 0
    ignored: int = 0
    dropped: int = 0
    stored: int = 0
    rejected: int = 0
    batches: int = 0
    mqtt_connected: bool = False
    last_batch_lag_s: float | None = None
    stored_by_kind: Counter[str] = field(default_factory=Counter)
    malformed_by_kind: Counter[str] = field(default_factory=Counter)
    _lags: deque[float] = field(default_factory=lambda: deque(maxlen=_LAG_SAMPLES))
    _rate: deque[tuple[float, int]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: Outcome, kind: str | None = None) -> None:
        with self._lock:
            self.received += 1
            if outcome == "queued":
                self.queued += 1
            elif outcome == "malformed":
                self.malformed += 1
                self.malformed_by_kind[kind or "unknown"] += 1
            elif outcome == "ignored":
                self.ignored += 1
            else:
                self.dropped += 1

    def record_batch(self, items: list[Received], *, committed_at: float, mono: float) -> None:
        lags = [committed_at - it.received_at for it in items]
        kinds = Counter(_kind_name(it.message) for it in items)
        with self._lock:
            self.stored += len(items)
            self.batches += 1
            self.stored_by_kind.update(kinds)
            self._lags.extend(lags)
            self.last_batch_lag_s = max(lags) if lags else None
            self._rate.append((mono, self.stored))
            while self._rate and mono - self._rate[0][0] > self.rate_window_s:
                self._rate.popleft()

    def record_rejected(self, kind: str) -> None:
        with self._lock:
            self.rejected += 1
            self.malformed_by_kind[f"{kind}:database"] += 1

    def snapshot(self, *, queue_depth: int = 0, mono: float | None = None) -> IngestSnapshot:
        now = time.monotonic() if mono is None else mono
        with self._lock:
            lags = sorted(self._lags)
            rate = 0.0
            if self._rate:
                t0, n0 = self._rate[0]
                # Stored since the oldest point of the window, over the window length.
                window = max(now - t0, 1e-3)
                rate = (self.stored - n0) / window if now - t0 <= self.rate_window_s * 2 else 0.0
            return IngestSnapshot(
                received=self.received,
                queued=self.queued,
                malformed=self.malformed,
                ignored=self.ignored,
                dropped=self.dropped,
                stored=self.stored,
                rejected=self.rejected,
                batches=self.batches,
                stored_by_kind=dict(self.stored_by_kind),
                malformed_by_kind=dict(self.malformed_by_kind),
                queue_depth=queue_depth,
                rate_per_s=rate,
                lag_p50_s=_percentile(lags, 0.50),
                lag_p95_s=_percentile(lags, 0.95),
                lag_max_s=lags[-1] if lags else None,
                last_batch_lag_s=self.last_batch_lag_s,
                mqtt_connected=self.mqtt_connected,
            )

    def reset_lags(self) -> None:
        with self._lock:
            self._lags.clear()


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.floor(q * len(sorted_values)))]


def _kind_name(message: Message) -> str:
    if isinstance(message, Telemetry):
        return "telemetry"
    if isinstance(message, Status):
        return "status"
    if isinstance(message, Reported):
        return "reported"
    return "events" if isinstance(message, Event) else "unknown"


def _topic_kind(topic: str) -> str:
    parts = topic.split("/")
    return parts[3] if len(parts) > 3 and parts[3] in MESSAGE_TYPES else "topic"


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


# --- the ingestor -----------------------------------------------------------------------


class _Buffer:
    """A bounded FIFO between the MQTT thread and the one writer thread.

    ``collections.deque`` appends/pops are atomic under the GIL, so the common path
    takes no lock; an Event wakes the writer on the first message and on a full batch,
    a Condition blocks producers only while the buffer is full.
    """

    def __init__(self, *, maxsize: int, batch_size: int) -> None:
        self._items: deque[Received] = deque()
        self.maxsize = maxsize
        self.batch_size = batch_size
        self._wake = threading.Event()
        self._space = threading.Condition()
        self._blocked = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Received, *, timeout: float) -> bool:
        """Append; when full, wait up to ``timeout`` for space. False if it stayed full."""
        items = self._items
        if len(items) >= self.maxsize:
            deadline = time.monotonic() + timeout
            with self._space:
                self._blocked += 1
                try:
                    while len(items) >= self.maxsize:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        self._space.wait(remaining)
                finally:
                    self._blocked -= 1
        items.append(item)
        n = len(items)
        if n == 1 or (n >= self.batch_size and not self._wake.is_set()):
            self._wake.set()
        return True

    def take(self, limit: int) -> list[Received]:
        items = self._items
        pop = items.popleft
        out = [pop() for _ in range(min(limit, len(items)))]
        if self._blocked:
            with self._space:
                self._space.notify_all()
        return out

    def clear_wake(self) -> None:
        self._wake.clear()

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)


_RETRYABLE = (OperationalError, InterfaceError, DisconnectionError)


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
    ) -> None:
        self.db = db
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.enqueue_timeout_s = enqueue_timeout_s
        self.stats = stats or IngestStats()
        self.clock = clock
        self._queue = _Buffer(maxsize=queue_size, batch_size=batch_size)
        self._known: set[str] = set()
        self._seen: dict[str, Seen] = {}
        self._touched_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._done = 0
        self._log = _LogLimiter()

    # called on the MQTT network thread -------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Decode one message and queue it; never raises (everything is counted)."""
        try:
            decoded = decode_message(topic, payload)
        except MalformedMessageError as err:
            self.stats.count("malformed", _topic_kind(topic))
            self._log.warning("malformed message skipped: %s", err)
            return "malformed"
        except Exception as err:  # noqa: BLE001 - a decoder bug must not stop ingestion
            self.stats.count("malformed", _topic_kind(topic))
            self._log.warning("message on %r could not be decoded: %r", topic, err)
            return "malformed"
        if decoded is None:
            self.stats.count("ignored")
            return "ignored"
        device_id, message = decoded
        return self.enqueue(
            Received(topic=topic, device_id=device_id, message=message, received_at=self.clock())
        )

    def enqueue(self, item: Received) -> Outcome:
        """Queue an already decoded message (``handle`` does this after decoding)."""
        if not self._queue.put(item, timeout=self.enqueue_timeout_s):
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
        delay = 0.5
        while True:
            try:
                with self.db.begin() as conn:
                    write_batch(conn, collected, known=self._known, touch=seen if touch else None)
            except _RETRYABLE as err:
                if self._stop.is_set() and delay > 2:
                    log.error("database unavailable while stopping: %d messages lost", len(batch))
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
                delay = min(delay * 2, 5.0)
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
            self._finish(len(batch))
            return

    def _write_one_by_one(self, batch: list[Received]) -> None:
        for item in batch:
            try:
                with self.db.begin() as conn:
                    write_messages(conn, [item])
            except Exception as err:  # noqa: BLE001 - count it, log the topic, go on
                self.stats.record_rejected(_kind_name(item.message))
                self._log.warning(
                    "message on %s rejected by the database: %s", item.topic, _short(err)
                )
            else:
                self.stats.record_batch([item], committed_at=self.clock(), mono=time.monotonic())
            self._finish(1)

    def _finish(self, n: int) -> None:
        with self._idle:
            self._done += n
            self._idle.notify_all()


def _short(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).splitlines()
    return f"{err.__class__.__name__}: {text[0] if text else ''}"[:300]
