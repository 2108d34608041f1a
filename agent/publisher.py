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
  Where nothing is ahead of a message (connected and settled, queue and spool empty, room in
  the window, not a burst) its producer hands it to paho itself under the same window lock
  (``Sender.send_now``): paho's own calls never block, and at camera rates that saves the
  publisher thread's wake-up per message.
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

Nothing outside the protocol's bounds (``protocol.limits``) is published: every message is
built and checked by ``protocol.encode_checked`` where it is made (pipeline, telemetry, app,
OTA manager; a test keeps ``encode`` out of the agent's publishing code), which fits it to
the bounds or refuses it there, once per message. Here every payload's size is checked
against its kind's limit: one over it would be refused by the broker (``message_size_limit``)
and, being QoS 1 and ordered, block the queue behind it forever. Such a payload is logged (at
most once a minute per kind) and dropped, never raised to the caller.

Modules: this one is the API (:class:`Publisher`) and shutdown; :mod:`agent.outbox` holds the
shared queue and connection state, :mod:`agent.sender` the publisher thread and its in-flight
window, :mod:`agent.mqtt_client` the paho connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.mqtt_client import (
    DEFAULT_SESSION_EXPIRY_S,
    MessageHandler,
    MqttConnection,
    Will,
)
from agent.outbox import TICK_S, Outbox, OutMessage
from agent.sender import Sender
from agent.spool.queue import Spool
from protocol import (
    ProtocolError,
    events_topic,
    reported_topic,
    status_topic,
    telemetry_topic,
    validate_device_id,
)
from protocol.checked import check_size

log = logging.getLogger(__name__)

REFUSED_LOG_EVERY_S = 60.0
"""A refused message is logged at most this often per kind; the others are counted."""


class RefusedLog:
    """Logs refused messages at most once per ``every_s`` per key, with the count left out."""

    def __init__(self, what: str, *, every_s: float = REFUSED_LOG_EVERY_S) -> None:
        self.what = what
        self.every_s = every_s
        self.total = 0
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def refused(self, key: str, err: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            last, suppressed = self._last.get(key, (float("-inf"), 0))
            if now - last < self.every_s:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.error(
            "%s: dropped a %s message outside the protocol's bounds: %s%s; this is an agent "
            "bug, please report it with this line",
            self.what,
            key,
            err,
            more,
        )


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
        will_payload: bytes | Callable[[int], bytes],
        client_id: str | None = None,
        tls_resolver: Callable[[str], Path] | None = None,
        max_inflight: int = 100,
        clock: Callable[[], float] = time.time,
        queue_size: int = 1000,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float | None = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        on_connection_change: Callable[[bool], None] | None = None,
        linger_s: float = 0.005,
    ) -> None:
        """``linger_s``: while messages come faster than one per ``linger_s`` (a burst: inference
        at full speed, a spool replay), the publisher thread waits this long after the first
        one for more (up to ``agent.outbox.BATCH``) and hands them to paho together, and it
        collects acknowledgements on this beat instead of being woken by each one: one wake-up
        of the publisher and of paho's network thread per batch instead of per message
        (measured in bench/pipeline.py: per-message wake-ups cost the inference thread ~10% of
        its rate on a 2-core machine). At camera rates nothing lingers. 0 hands every message
        over at once. ``reconnect_max_s``: by default ``broker.reconnect_max_s``."""
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._device_id = validate_device_id(device_id)
        self._refused = RefusedLog(f"device {device_id}")
        self._status_topic = status_topic(device_id)
        self._will_payload = will_payload
        self._check("status", self._will_bytes(1))
        self._reported_topic = reported_topic(device_id)
        self._events_topic = events_topic(device_id)
        self._spool = spool
        self.on_connection_change = on_connection_change
        # Shared with callers and paho's network thread, guarded by its condition. Never call
        # paho while holding it: paho calls on_published with its own locks held.
        self._out = Outbox(spool, queue_size=queue_size, linger_s=max(0.0, linger_s), clock=clock)
        self._conn = MqttConnection(
            broker=broker,
            client_id=client_id or broker.client_id or f"edgefleet-agent-{device_id}",
            will=self._will,
            tls_resolver=tls_resolver,
            session_expiry_s=session_expiry_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            on_published=self._on_published,
        )
        self._sender = Sender(
            self._out,
            self._conn,
            max_inflight=max_inflight,
            status_topic=self._status_topic,
            telemetry_topic=telemetry_topic(device_id),
        )

    # --- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._out.connected

    @property
    def connections(self) -> int:
        """Connections made so far: the one up now (or the last one) is this number."""
        return self._conn.connections

    def _will_bytes(self, connection: int) -> bytes:
        payload = self._will_payload
        return payload(connection) if callable(payload) else payload

    def _will(self, connection: int) -> Will:
        """The retained last will of connection number ``connection``."""
        return Will(self._status_topic, self._will_bytes(connection), qos=1, retain=True)

    @property
    def connection_changed_at(self) -> float:
        """When the connection state last changed (``clock`` time)."""
        return self._out.changed_at

    @property
    def spool_depth(self) -> int:
        return self._spool.depth

    @property
    def spool_dropped(self) -> int:
        return self._spool.dropped

    @property
    def published(self) -> int:
        """Messages the broker acknowledged (QoS 1) or that were sent (QoS 0)."""
        return self._sender.published

    @property
    def in_flight(self) -> int:
        """Ordered messages handed to the broker and not yet acknowledged."""
        return self._sender.in_flight

    @property
    def queued(self) -> int:
        """Ordered messages not yet acknowledged: in flight, in the live queue and spooled."""
        # In-flight spool records are still counted by the spool until acknowledged.
        return self._sender.inflight_live + len(self._out.live) + self._spool.depth

    @property
    def refused(self) -> int:
        """Messages dropped here because they were over their kind's size limit."""
        return self._refused.total

    @property
    def rejected(self) -> int:
        """QoS 1 messages the broker refused (e.g. by ACL); they are not retried."""
        return self._out.rejected

    def start(self) -> None:
        """Start connecting (in the background) and the publisher thread."""
        if self._sender.started or self._out.closed:
            return
        self._sender.start()
        self._conn.start()

    def publish_detections(self, topic: str, payload: bytes) -> None:
        """Queue a detections message (QoS 1, not retained); never blocks on the network."""
        if self._check("detections", payload):
            self._queue(OutMessage(topic, payload, 1))

    def publish_event(self, payload: bytes) -> None:
        """Queue an event (QoS 1, not retained), ordered and spooled like detections."""
        if self._check("events", payload):
            self._queue(OutMessage(self._events_topic, payload, 1))

    def _queue(self, msg: OutMessage) -> None:
        """An ordered message: handed to paho at once where nothing is ahead of it
        (``Sender.send_now``), else queued for the publisher thread."""
        if not self._sender.send_now(msg):
            self._out.enqueue(msg)

    def publish_status(self, payload: bytes) -> None:
        """Set the retained status (QoS 1); the latest one is re-sent after every reconnect."""
        if self._check("status", payload):
            self._out.set_retained(self._status_topic, payload)

    def publish_reported(self, payload: bytes) -> None:
        """Set the retained reported state (QoS 1); the latest is re-sent after reconnects."""
        if self._check("reported", payload):
            self._out.set_retained(self._reported_topic, payload)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Set any other retained message (QoS 1), e.g. Home Assistant discovery; re-sent
        after reconnects like the status."""
        self._out.set_retained(topic, payload)

    def flush_retained(self, timeout: float) -> bool:
        """Wait until the retained messages set so far are acknowledged (while connected).

        A later retained message on the same topic replaces one not yet sent; call this after
        a state every subscriber must see (``stopping``) before it is replaced. Returns False
        when ``timeout`` passed or the connection is down with something unsent.
        """
        deadline = time.monotonic() + timeout
        out = self._out
        with out.cond:
            # retained_inflight belongs to the publisher thread; only its emptiness is read.
            while out.retained_dirty or self._sender.retained_inflight:
                left = deadline - time.monotonic()
                if left <= 0 or not out.connected or out.closed:
                    return False
                out.cond.wait(min(left, TICK_S / 5))
        return True

    def publish_telemetry(self, payload: bytes) -> None:
        """Send telemetry at QoS 0 if connected; dropped while offline (it is periodic)."""
        if self._check("telemetry", payload):
            self._out.add_telemetry(payload)

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
        out = self._out
        if out.closed:
            return
        deadline = time.monotonic() + timeout
        if final_status is not None and not self._check("status", final_status):
            final_status = None
        with out.cond:
            if final_status is not None:
                out.retained[self._status_topic] = final_status
                out.retained_dirty.add(self._status_topic)
            out.closing = True
            out.flushed = False
            out.wake = True
            out.cond.notify_all()
            if self._sender.started:
                while out.connected and not out.flushed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    out.cond.wait(left)
            out.stop = True
            out.cond.notify_all()
        self._sender.join()
        self._conn.stop()
        with out.cond:
            out.closed = True
            acked, out.acked = out.acked, set()
            live = list(out.live)
            out.live.clear()
        unacked = self._sender.take_unacked(acked)
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

    def _check(self, kind: str, payload: bytes) -> bool:
        """True if ``payload`` is within the size limit of ``kind`` messages; else log
        (rate-limited) and count it."""
        try:
            check_size(kind, len(payload))
        except ProtocolError as err:
            self._refused.refused(kind, err)
            return False
        return True

    # --- connection hooks (paho's network thread) -----------------------------------------

    def _on_connected(self, receive_max: int) -> None:
        self._out.connection_up(receive_max)
        self._notify_change(True)

    def _on_disconnected(self) -> None:
        self._out.connection_down()
        self._notify_change(False)

    def _on_published(self, mid: int, failed: bool) -> None:
        self._out.acknowledged(mid, failed)

    def _notify_change(self, connected: bool) -> None:
        if self.on_connection_change is not None:
            try:
                self.on_connection_change(connected)
            except Exception:
                log.exception("on_connection_change callback failed")
