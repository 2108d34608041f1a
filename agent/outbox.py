"""What the publisher has to send, and the connection state, under one condition.

:class:`Outbox` is shared by the producers (any thread), paho's network thread (connection
changes and acknowledgements) and the sender thread (:mod:`agent.sender`): the bounded live
queue of ordered messages, the latest retained message per topic, recent telemetry and the
connection flags. Everything in it is read and written with ``cond`` held; nothing here calls
paho (paho calls the acknowledgement hook with its own locks held). See :mod:`agent.publisher`
for the ordering rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import AgentError
from agent.spool.queue import Spool

log = logging.getLogger(__name__)

TICK_S = 0.25
"""Longest the sender thread sleeps without an event (spool syncs happen on this beat)."""
BATCH = 32
"""Live messages that end a linger at once (see ``Publisher``'s ``linger_s``)."""


@dataclass(frozen=True, slots=True)
class OutMessage:
    """One message to publish."""

    topic: str
    payload: bytes
    qos: int


class Outbox:
    """The live queue, retained messages, telemetry and connection state (guarded by ``cond``).

    Attributes are shared state: read or write them only with ``cond`` held, and set ``wake``
    (and notify) when the sender thread has something new to do.
    """

    def __init__(
        self, spool: Spool, *, queue_size: int, linger_s: float, clock: Callable[[], float]
    ) -> None:
        self.cond = threading.Condition()
        self.spool = spool
        self.queue_size = queue_size
        self.linger_s = linger_s
        self._clock = clock
        self.live: deque[OutMessage] = deque()
        self.telemetry: deque[bytes] = deque(maxlen=4)
        self.retained: dict[str, bytes] = {}
        self.retained_dirty: set[str] = set()
        self.acked: set[int] = set()
        """Message ids paho reported as acknowledged (or sent), not yet taken by the sender."""
        self.connected = False
        self.epoch = 0
        """Counts connections; the sender re-sends the retained messages on a new one."""
        self.receive_max = 65535
        self.last_enqueue = 0.0
        self._claimed_at = 0.0
        self.bursting = False
        self.wake = False
        self.stop = False
        self.closing = False
        self.closed = False
        self.flushed = True
        self.rejected = 0
        self.lost = 0
        self.changed_at = clock()

    # --- producers ------------------------------------------------------------------------

    def enqueue(self, msg: OutMessage) -> None:
        """Append an ordered message to the live queue; a full queue spills to the spool."""
        with self.cond:
            if self.closed:
                self.lost += 1
                if self.lost == 1:
                    log.warning("message published after close() is dropped (topic %s)", msg.topic)
                return
            if len(self.live) >= self.queue_size:
                # Spill everything queued, then this one: order stays in flight < spool < live.
                batch = [*self.live, msg]
                self.live.clear()
                self.spill(batch)
            else:
                self.live.append(msg)
            now = time.monotonic()
            self.bursting = now - self.last_enqueue < self.linger_s
            self.last_enqueue = now
            self.wake = True
            # The sender thread drains the whole queue per pass: wake it for the first
            # message of a burst, and again when a batch is full while it lingers.
            if len(self.live) in (0, 1, BATCH) or self.closing or not self.linger_s:
                self.cond.notify_all()

    def claim_direct(self, seen_epoch: int) -> tuple[set[int], int] | None:
        """For a producer about to hand its message to paho itself (``Sender.send_now``):
        None when the message must be queued instead (not connected, a connection the sender
        has not settled, closing, anything queued, spooled or retained-pending, or a burst);
        else the acknowledgements to settle first and the broker's Receive Maximum. A claim
        counts as an enqueue for burst detection; :meth:`unclaim` when it is not used."""
        with self.cond:
            now = time.monotonic()
            if (
                not self.connected
                or self.epoch != seen_epoch
                or self.closing
                or self.closed
                or self.live
                or self.retained_dirty
                or self.spool.depth
                or now - self.last_enqueue < self.linger_s
            ):
                return None
            self._claimed_at, self.last_enqueue = self.last_enqueue, now
            self.bursting = False
            acked, self.acked = self.acked, set()
            return acked, self.receive_max

    def unclaim(self) -> None:
        """A claim whose message goes to the queue after all (the window was full)."""
        with self.cond:
            self.last_enqueue = self._claimed_at

    def spill(self, batch: list[OutMessage]) -> None:
        """Append ``batch`` to the end of the spool (``cond`` held); counted as lost on error."""
        try:
            self.spool.append_many([(m.topic, m.payload, m.qos) for m in batch])
        except AgentError as err:
            self.lost += len(batch)
            log.error("lost %d messages: %s", len(batch), err)

    def set_retained(self, topic: str, payload: bytes) -> None:
        """Replace the retained message of ``topic``; the sender sends the latest one."""
        with self.cond:
            self.retained[topic] = payload
            self.retained_dirty.add(topic)
            self.wake = True
            self.cond.notify_all()

    def add_telemetry(self, payload: bytes) -> None:
        """Queue telemetry if connected; dropped while offline (it is periodic)."""
        with self.cond:
            if self.connected and not self.closed:
                self.telemetry.append(payload)
                self.wake = True
                self.cond.notify_all()

    # --- connection events (paho's network thread) -----------------------------------------

    def connection_up(self, receive_max: int) -> None:
        with self.cond:
            self.connected = True
            self.epoch += 1
            self.receive_max = receive_max
            self.changed_at = self._clock()
            self.wake = True
            self.cond.notify_all()

    def connection_down(self) -> None:
        with self.cond:
            self.connected = False
            self.changed_at = self._clock()
            self.wake = True
            self.cond.notify_all()

    def acknowledged(self, mid: int, failed: bool) -> None:
        """Paho finished message ``mid`` (``failed``: the broker refused it)."""
        with self.cond:
            self.acked.add(mid)
            if failed:
                self.rejected += 1
                if self.rejected == 1:
                    log.warning(
                        "the broker refused a message (not authorized by its ACL?); refused "
                        "messages are not retried, see the 'rejected' count"
                    )
            self.wake = True
            # Acknowledgements are collected on the linger beat while messages are in
            # flight; close() waits for them, and queued messages may wait for room in the
            # window (a producer found it full), so those are woken at once.
            if self.closing or failed or not self.linger_s or self.live:
                self.cond.notify_all()
