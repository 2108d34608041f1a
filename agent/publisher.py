"""The agent's single owner of MQTT message order: live queue, on-disk spool, replay.

Ordered messages (detections, events; QoS 1) live in exactly one of three places, and their
order is always ``in flight (handed to paho, not yet acknowledged) < spool < live queue``:

- ``publish_detections``/``publish_event`` append to a bounded in-memory live queue and return
  (they never block the inference thread on the network). When that queue is full its whole
  content plus the new message is spilled to the end of the spool, which keeps the order.
- A publisher thread hands messages to paho, at most ``max_inflight`` unacknowledged at a
  time (also capped by the broker's Receive Maximum). It sends from the spool while the spool
  has records, and from the live queue only once the spool is empty; spool and live messages
  are never in flight together, so the in-flight set is always a contiguous stretch.
- As soon as a disconnect is seen nothing more is handed to paho; the live queue moves to the
  spool. Paho keeps what is in flight and re-sends it (DUP) after the reconnect. Only when all
  of it has been acknowledged ("settling") does the thread re-publish the retained status /
  reported state and resume the spool, in order, then live messages. A subscriber therefore
  sees every message in order; duplicates can only come from QoS 1 itself (an acknowledgement
  lost with the connection), and consumers drop them by ``seq``.
- ``close()`` waits for acknowledgements up to a timeout, disconnects cleanly and puts what was
  never acknowledged back in front of the spool (``Spool.prepend``) and the live queue behind
  it, so a restarted agent delivers everything, in order.

What a crash can lose: ``close()`` loses nothing. ``kill -9`` of the agent loses what was
only in memory (the live queue, at most ``queue_size`` messages, and what paho held in flight,
at most ``max_inflight``); spooled records survive it (see ``agent.spool`` for power loss).
While connected the live queue is normally near-empty, so that is well under a second of
detections; while offline everything goes to the spool within one publisher-thread pass.

Status and reported state are retained QoS 1; only the latest of each matters, it is sent when
connected and again after every reconnect (the last will may have replaced the status
meanwhile). Telemetry is QoS 0 and dropped while offline: it is periodic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.mqtt_client import (
    DEFAULT_SESSION_EXPIRY_S,
    MessageHandler,
    MqttConnection,
    Will,
)
from agent.spool import Spool
from protocol import (
    events_topic,
    reported_topic,
    status_topic,
    telemetry_topic,
    validate_device_id,
)

log = logging.getLogger(__name__)

_TICK_S = 0.25
"""Longest the publisher thread sleeps without an event (spool syncs happen on this beat)."""
_RETAINED_RESERVE = 4
"""In-flight slots kept free for retained messages under the broker's Receive Maximum."""
_BATCH = 32
"""Live messages that end a linger at once (see ``linger_s``)."""


@dataclass(frozen=True, slots=True)
class _Msg:
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True, slots=True)
class _Inflight:
    mid: int
    msg: _Msg
    spool_index: int | None
    """Index of the spool record this came from; None for a live message."""


class Publisher:
    """Publishes the agent's messages with ordered, at-least-once delivery of detections.

    Call :meth:`start` once, then the ``publish_*`` methods from any thread, then
    :meth:`close`. The publisher owns ``spool`` and closes it in :meth:`close`.
    """

    def __init__(
        self,
        *,
        device_id: str,
        broker: BrokerConfig,
        spool: Spool,
        will_payload: bytes,
        client_id: str | None = None,
        tls_resolver: Callable[[str], Path] | None = None,
        max_inflight: int = 100,
        clock: Callable[[], float] = time.time,
        queue_size: int = 1000,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        on_connection_change: Callable[[bool], None] | None = None,
        linger_s: float = 0.005,
    ) -> None:
        """``linger_s``: while messages come faster than one per ``linger_s`` (a burst: inference
        at full speed, a spool replay), the publisher thread waits this long after the first
        one for more (up to ``_BATCH``) and hands them to paho together, and it collects
        acknowledgements on this beat instead of being woken by each one: one wake-up of the
        publisher and of paho's network thread per batch instead of per message (measured in
        bench/pipeline.py: per-message wake-ups cost the inference thread ~10% of its rate on
        a 2-core machine). At camera rates nothing lingers. 0 hands every message over at once."""
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._device_id = validate_device_id(device_id)
        self._status_topic = status_topic(device_id)
        self._telemetry_topic = telemetry_topic(device_id)
        self._reported_topic = reported_topic(device_id)
        self._events_topic = events_topic(device_id)
        self._spool = spool
        self._max_inflight = max_inflight
        self._queue_size = queue_size
        self._linger_s = max(0.0, linger_s)
        self._last_enqueue = 0.0
        self._bursting = False
        self._clock = clock
        self.on_connection_change = on_connection_change
        self._conn = MqttConnection(
            broker=broker,
            client_id=client_id or broker.client_id or f"edgefleet-agent-{device_id}",
            will=Will(topic=self._status_topic, payload=will_payload, qos=1, retain=True),
            tls_resolver=tls_resolver,
            session_expiry_s=session_expiry_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            on_published=self._on_published,
        )

        # Shared with callers and paho's network thread, guarded by _cond. Never call paho
        # while holding it: paho calls on_published with its own locks held.
        self._cond = threading.Condition()
        self._live: deque[_Msg] = deque()
        self._telemetry: deque[bytes] = deque(maxlen=4)
        self._retained: dict[str, bytes] = {}
        self._retained_dirty: set[str] = set()
        self._acked: set[int] = set()
        self._connected = False
        self._epoch = 0
        self._receive_max = 65535
        self._wake = False
        self._stop = False
        self._closing = False
        self._closed = False
        self._flushed = True
        self._rejected = 0
        self._lost = 0
        self._changed_at = clock()

        # Owned by the publisher thread (and by close() once the thread has stopped).
        self._thread: threading.Thread | None = None
        self._inflight: deque[_Inflight] = deque()
        self._inflight_live = 0
        self._retained_inflight: dict[str, int] = {}
        self._acked_local: set[int] = set()
        self._seen_epoch = 0
        self._settling = False
        self._published = 0

    # --- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connection_changed_at(self) -> float:
        """When the connection state last changed (``clock`` time)."""
        return self._changed_at

    @property
    def spool_depth(self) -> int:
        return self._spool.depth

    @property
    def spool_dropped(self) -> int:
        return self._spool.dropped

    @property
    def published(self) -> int:
        """Messages the broker acknowledged (QoS 1) or that were sent (QoS 0)."""
        return self._published

    @property
    def in_flight(self) -> int:
        """Ordered messages handed to the broker and not yet acknowledged."""
        return len(self._inflight)

    @property
    def queued(self) -> int:
        """Ordered messages not yet acknowledged: in flight, in the live queue and spooled."""
        # In-flight spool records are still counted by the spool until acknowledged.
        return self._inflight_live + len(self._live) + self._spool.depth

    @property
    def rejected(self) -> int:
        """QoS 1 messages the broker refused (e.g. by ACL); they are not retried."""
        return self._rejected

    def start(self) -> None:
        """Start connecting (in the background) and the publisher thread."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()
        self._conn.start()

    def publish_detections(self, topic: str, payload: bytes) -> None:
        """Queue a detections message (QoS 1, not retained); never blocks on the network."""
        self._enqueue(_Msg(topic, payload, 1))

    def publish_event(self, payload: bytes) -> None:
        """Queue an event (QoS 1, not retained), ordered and spooled like detections."""
        self._enqueue(_Msg(self._events_topic, payload, 1))

    def publish_status(self, payload: bytes) -> None:
        """Set the retained status (QoS 1); the latest one is re-sent after every reconnect."""
        self._set_retained(self._status_topic, payload)

    def publish_reported(self, payload: bytes) -> None:
        """Set the retained reported state (QoS 1); the latest is re-sent after reconnects."""
        self._set_retained(self._reported_topic, payload)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Set any other retained message (QoS 1), e.g. Home Assistant discovery; re-sent
        after reconnects like the status."""
        self._set_retained(topic, payload)

    def flush_retained(self, timeout: float) -> bool:
        """Wait until the retained messages set so far are acknowledged (while connected).

        A later retained message on the same topic replaces one not yet sent; call this after
        a state every subscriber must see (``stopping``) before it is replaced. Returns False
        when ``timeout`` passed or the connection is down with something unsent.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            # _retained_inflight belongs to the publisher thread; only its emptiness is read.
            while self._retained_dirty or self._retained_inflight:
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected or self._closed:
                    return False
                self._cond.wait(min(left, _TICK_S / 5))
        return True

    def publish_telemetry(self, payload: bytes) -> None:
        """Send telemetry at QoS 0 if connected; dropped while offline (it is periodic)."""
        with self._cond:
            if self._connected and not self._closed:
                self._telemetry.append(payload)
                self._wake = True
                self._cond.notify_all()

    def subscribe(
        self, topic_filter: str, handler: MessageHandler, qos: int = 1
    ) -> Callable[[], None]:
        """Subscribe (renewed after reconnects); returns the function that unsubscribes."""
        return self._conn.subscribe(topic_filter, handler, qos)

    def close(self, final_status: bytes | None = None, timeout: float = 3.0) -> None:
        """Flush, persist what is unacknowledged to the spool, and disconnect cleanly.

        ``final_status`` (e.g. ``offline``) is published retained first. Waits up to
        ``timeout`` seconds for acknowledgements while connected. The clean DISCONNECT means
        the broker does not publish the last will. Closes the spool.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            if final_status is not None:
                self._retained[self._status_topic] = final_status
                self._retained_dirty.add(self._status_topic)
            self._closing = True
            self._flushed = False
            self._wake = True
            self._cond.notify_all()
            if self._thread is not None:
                while self._connected and not self._flushed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._conn.stop()
        with self._cond:
            self._closed = True
            acked, self._acked = self._acked, set()
            live = list(self._live)
            self._live.clear()
        self._settle(acked)
        unacked = [e.msg for e in self._inflight if e.spool_index is None]
        self._inflight.clear()
        self._inflight_live = 0
        try:
            if unacked:
                self._spool.prepend([(m.topic, m.payload, m.qos) for m in unacked])
            if live:
                self._spool.append_many([(m.topic, m.payload, m.qos) for m in live])
        except AgentError as err:
            log.error(
                "could not spool %d unsent messages at shutdown: %s", len(unacked) + len(live), err
            )
        finally:
            self._spool.close()
        if self._spool.depth:
            log.info("%d messages stay in the spool for the next start", self._spool.depth)

    # --- producers ------------------------------------------------------------------------

    def _enqueue(self, msg: _Msg) -> None:
        with self._cond:
            if self._closed:
                self._lost += 1
                if self._lost == 1:
                    log.warning("message published after close() is dropped (topic %s)", msg.topic)
                return
            if len(self._live) >= self._queue_size:
                # Spill everything queued, then this one: order stays in flight < spool < live.
                batch = [*self._live, msg]
                self._live.clear()
                self._spool_append(batch)
            else:
                self._live.append(msg)
            now = time.monotonic()
            self._bursting = now - self._last_enqueue < self._linger_s
            self._last_enqueue = now
            self._wake = True
            # The publisher thread drains the whole queue per pass: wake it for the first
            # message of a burst, and again when a batch is full while it lingers.
            if len(self._live) in (0, 1, _BATCH) or self._closing or not self._linger_s:
                self._cond.notify_all()

    def _spool_append(self, batch: list[_Msg]) -> None:
        try:
            self._spool.append_many([(m.topic, m.payload, m.qos) for m in batch])
        except AgentError as err:
            self._lost += len(batch)
            log.error("lost %d messages: %s", len(batch), err)

    def _set_retained(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self._retained[topic] = payload
            self._retained_dirty.add(topic)
            self._wake = True
            self._cond.notify_all()

    # --- paho callbacks (network thread) ---------------------------------------------------

    def _on_connected(self, receive_max: int) -> None:
        with self._cond:
            self._connected = True
            self._epoch += 1
            self._receive_max = receive_max
            self._changed_at = self._clock()
            self._wake = True
            self._cond.notify_all()
        self._notify_change(True)

    def _on_disconnected(self) -> None:
        with self._cond:
            self._connected = False
            self._changed_at = self._clock()
            self._wake = True
            self._cond.notify_all()
        self._notify_change(False)

    def _notify_change(self, connected: bool) -> None:
        if self.on_connection_change is not None:
            try:
                self.on_connection_change(connected)
            except Exception:
                log.exception("on_connection_change callback failed")

    def _on_published(self, mid: int, failed: bool) -> None:
        with self._cond:
            self._acked.add(mid)
            if failed:
                self._rejected += 1
                if self._rejected == 1:
                    log.warning(
                        "the broker refused a message (not authorized by its ACL?); refused "
                        "messages are not retried, see the 'rejected' count"
                    )
            self._wake = True
            # Acknowledgements are collected on the linger beat while messages are in
            # flight; close() waits for them, so it is woken at once.
            if self._closing or failed or not self._linger_s:
                self._cond.notify_all()

    # --- publisher thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._pass():
                    return
            except Exception:
                log.exception("publisher thread error; continuing")
                time.sleep(_TICK_S)

    def _pass(self) -> bool:
        """One round of work; False when the thread must stop."""
        with self._cond:
            if not self._wake and not self._stop:
                busy = self._linger_s and (self._inflight or self._retained_inflight)
                self._cond.wait(self._linger_s if busy else _TICK_S)
            if (
                self._bursting
                and self._live
                and len(self._live) < _BATCH
                and self._connected
                and not self._closing
                and not self._stop
            ):
                self._cond.wait(self._linger_s)  # let the burst fill a batch
            if self._stop:
                return False
            self._wake = False
            connected = self._connected
            epoch = self._epoch
            acked, self._acked = self._acked, set()
            telemetry = list(self._telemetry)
            self._telemetry.clear()
            if not connected and self._live:
                batch = list(self._live)
                self._live.clear()
                self._spool_append(batch)
            if connected and epoch != self._seen_epoch:
                self._seen_epoch = epoch
                self._settling = True
                self._retained_dirty |= set(self._retained)
        self._settle(acked)
        if connected:
            if self._settling and not self._inflight and not self._retained_inflight:
                self._settling = False
            for payload in telemetry:
                info = self._conn.publish(self._telemetry_topic, payload, qos=0, retain=False)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    self._published += 1
            if not self._settling:
                self._publish_retained()
                self._fill()
        self._spool.sync_if_due()
        with self._cond:
            if self._closing:
                self._flushed = (
                    not self._inflight
                    and not self._retained_inflight
                    and not self._retained_dirty
                    and (not self._live or self._spool.depth > 0)
                )
                if self._flushed:
                    self._cond.notify_all()
        return True

    def _settle(self, acked: set[int]) -> None:
        """Retire acknowledged messages (in order) and ack their spool records."""
        done = self._acked_local
        done |= acked
        if not done:
            return
        spool_upto: int | None = None
        while self._inflight and self._inflight[0].mid in done:
            entry = self._inflight.popleft()
            done.discard(entry.mid)
            self._published += 1
            if entry.spool_index is not None:
                spool_upto = entry.spool_index
            else:
                self._inflight_live -= 1
        for topic, mid in list(self._retained_inflight.items()):
            if mid in done:
                del self._retained_inflight[topic]
                done.discard(mid)
                self._published += 1
        if spool_upto is not None:
            self._spool.ack_through(spool_upto)
        if done:
            # Keep only acks of tracked messages that wait behind an unacknowledged one
            # (QoS 0 sends are reported too, and would pile up).
            tracked = {e.mid for e in self._inflight}
            done &= tracked

    def _publish_retained(self) -> None:
        with self._cond:
            todo = [
                (t, self._retained[t])
                for t in sorted(self._retained_dirty)
                if t not in self._retained_inflight
            ]
            self._retained_dirty.difference_update(t for t, _ in todo)
        # Status first, so `stopping`/`offline` leads what close() still sends.
        todo.sort(key=lambda item: item[0] != self._status_topic)
        for topic, payload in todo:
            info = self._conn.publish(topic, payload, qos=1, retain=True)
            self._retained_inflight[topic] = info.mid

    def _fill(self) -> None:
        """Hand ordered messages to paho, up to the in-flight limit."""
        limit = max(1, min(self._max_inflight, self._receive_max - _RETAINED_RESERVE))
        room = limit - len(self._inflight)
        if room <= 0 or not self._connected:
            return
        spool = self._spool
        with self._cond:
            # Checked together with the pop: a spill (under the same lock) moves the whole
            # live queue to the spool, so live messages never overtake spooled ones.
            batch = (
                [self._live.popleft() for _ in range(min(room, len(self._live)))]
                if spool.depth == 0
                else []
            )
        # Messages handed to paho after an unseen disconnect are kept by paho and re-sent
        # after the reconnect; they are tracked like any other in-flight message.
        for msg in batch:
            info = self._conn.publish(msg.topic, msg.payload, qos=msg.qos, retain=False)
            self._inflight.append(_Inflight(info.mid, msg, None))
            self._inflight_live += 1
        if batch or spool.depth == 0 or self._closing:
            return  # a closing publisher leaves what is spooled in the spool
        if any(e.spool_index is None for e in self._inflight):
            return  # live messages precede the spilled ones: let them settle first
        head = spool.head_index
        skip = sum(1 for e in self._inflight if e.spool_index is not None and e.spool_index >= head)
        for rec in spool.peek(room, skip=skip):
            info = self._conn.publish(rec.topic, rec.payload, qos=rec.qos, retain=False)
            self._inflight.append(
                _Inflight(info.mid, _Msg(rec.topic, rec.payload, rec.qos), rec.index)
            )
