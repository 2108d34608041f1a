"""The publisher thread: hands what the outbox holds to paho, in order, and retires it on ack.

:class:`Sender` owns the in-flight window (ordered messages handed to paho and not yet
acknowledged, at most ``max_inflight`` and the broker's Receive Maximum), sends the spool
before the live queue, re-sends the retained messages after a reconnect once everything in
flight has settled, and acknowledges spool records as the broker confirms them. See
:mod:`agent.publisher` for the ordering rules it keeps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from agent.mqtt_client import MqttConnection
from agent.outbox import BATCH, TICK_S, Outbox, OutMessage

log = logging.getLogger(__name__)

_RETAINED_RESERVE = 4
"""In-flight slots kept free for retained messages under the broker's Receive Maximum."""


@dataclass(frozen=True, slots=True)
class _Inflight:
    mid: int
    msg: OutMessage
    spool_index: int | None
    """Index of the spool record this came from; None for a live message."""


class Sender:
    """The thread that publishes the outbox; its own state is touched only by that thread
    (and by :meth:`take_unacked` once the thread has stopped)."""

    def __init__(
        self,
        outbox: Outbox,
        conn: MqttConnection,
        *,
        max_inflight: int,
        status_topic: str,
        telemetry_topic: str,
    ) -> None:
        self._out = outbox
        self._conn = conn
        self._max_inflight = max_inflight
        self._status_topic = status_topic
        self._telemetry_topic = telemetry_topic
        self._thread: threading.Thread | None = None
        self._send = threading.Lock()
        """Held while the window below is changed and paho is handed ordered messages: by
        this thread's passes, and by a producer that sends its message itself (send_now)."""
        self._inflight: deque[_Inflight] = deque()
        self.inflight_live = 0
        """Live (not spooled) messages in flight; spooled ones are still counted by the spool."""
        self.retained_inflight: dict[str, int] = {}
        """Retained messages in flight, by topic (the publisher reads only its emptiness)."""
        self._acked_local: set[int] = set()
        self._seen_epoch = 0
        self._settling = False
        self.published = 0
        """Messages the broker acknowledged (QoS 1) or that were sent (QoS 0)."""
        self.sent_now = 0
        """Ordered messages their producer handed to paho itself (:meth:`send_now`)."""

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the thread to end (after the outbox's ``stop`` was set)."""
        if self._thread is not None:
            self._thread.join()

    def take_unacked(self, acked: set[int]) -> list[OutMessage]:
        """Retire ``acked``, then empty the window; returns the live messages never
        acknowledged, in order. Only once the thread has stopped."""
        with self._send:
            self.settle(acked)
            unacked = [e.msg for e in self._inflight if e.spool_index is None]
            self._inflight.clear()
            self.inflight_live = 0
        return unacked

    def send_now(self, msg: OutMessage) -> bool:
        """Hand ``msg`` to paho on the caller's thread when nothing is ahead of it; False:
        queue it (:meth:`Outbox.enqueue`) for this thread.

        At camera rates this saves this thread's wake-up (and its pass) per message: 0.77-0.84x
        the CPU of publishing a detections message (bench/publish.py). Only when connected on a
        connection this thread has settled, with nothing queued, spooled, retained-pending or
        closing, and room in the window (``Outbox.claim_direct``): then no earlier ordered
        message can still be waiting, so the order holds. Never waits: when this thread is
        busy the message is queued. Bursts (messages closer than ``linger_s``) are queued
        too, so paho's thread still wakes once per batch.
        """
        if not self._send.acquire(blocking=False):
            return False
        try:
            claim = self._out.claim_direct(self._seen_epoch)
            if claim is None:
                return False
            acked, receive_max = claim
            self.settle(acked)
            if self._settling or len(self._inflight) >= self._limit(receive_max):
                self._out.unclaim()
                return False
            try:
                sent = self._conn.publish(msg.topic, msg.payload, qos=msg.qos, retain=False)
            except Exception:  # never into the producer (a stream's thread): queue it
                log.exception("handing a message to paho failed; queued for the publisher")
                self._out.unclaim()
                return False
            self._inflight.append(_Inflight(sent.mid, msg, None))
            self.inflight_live += 1
            self.sent_now += 1
            return True
        finally:
            self._send.release()

    def _limit(self, receive_max: int) -> int:
        """The in-flight window: ``max_inflight``, within the broker's Receive Maximum."""
        return max(1, min(self._max_inflight, receive_max - _RETAINED_RESERVE))

    # --- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._pass():
                    return
            except Exception:
                log.exception("publisher thread error; continuing")
                time.sleep(TICK_S)

    def _pass(self) -> bool:
        """One round of work; False when the thread must stop."""
        out = self._out
        with out.cond:
            if not out.wake and not out.stop:
                out.cond.wait(out.linger_s if self._on_beat() else TICK_S)
            if (
                out.bursting
                and out.live
                and len(out.live) < BATCH
                and out.connected
                and not out.closing
                and not out.stop
            ):
                out.cond.wait(out.linger_s)  # let the burst fill a batch
            if out.stop:
                return False
        with self._send:
            self._work()
        out.spool.sync_if_due()
        return True

    def _work(self) -> None:
        """The pass's work (``_send`` held): settle, telemetry, retained, ordered messages."""
        out = self._out
        with out.cond:
            out.wake = False
            connected = out.connected
            epoch = out.epoch
            acked, out.acked = out.acked, set()
            telemetry = list(out.telemetry)
            out.telemetry.clear()
            if not connected and out.live:
                batch = list(out.live)
                out.live.clear()
                out.spill(batch)
            if connected and epoch != self._seen_epoch:
                self._seen_epoch = epoch
                self._settling = True
                out.retained_dirty |= set(out.retained)
        self.settle(acked)
        if connected:
            if self._settling and not self._inflight and not self.retained_inflight:
                self._settling = False
            for payload in telemetry:
                if self._conn.publish(self._telemetry_topic, payload, qos=0, retain=False).sent:
                    self.published += 1
            if not self._settling:
                self._publish_retained()
                self._fill()
        with out.cond:
            if out.closing:
                out.flushed = (
                    not self._inflight
                    and not self.retained_inflight
                    and not out.retained_dirty
                    and (not out.live or out.spool.depth > 0)
                )
                if out.flushed:
                    out.cond.notify_all()

    def _on_beat(self) -> bool:
        """Whether to collect acknowledgements on the linger beat (``cond`` held): while a
        burst, a spool replay, a retained message or a reconnect's re-sends are in flight,
        something waits on them. At camera rates a live message's acknowledgement is
        collected on the next message's pass (or after ``TICK_S``): one wake-up of this
        thread per message instead of two."""
        if not self._out.linger_s:
            return False
        if self.retained_inflight or self._settling:
            return True
        if not self._inflight:
            return False
        return self._out.bursting or self.inflight_live < len(self._inflight)

    def settle(self, acked: set[int]) -> None:
        """Retire acknowledged messages (in order) and ack their spool records."""
        done = self._acked_local
        done |= acked
        if not done:
            return
        spool_upto: int | None = None
        while self._inflight and self._inflight[0].mid in done:
            entry = self._inflight.popleft()
            done.discard(entry.mid)
            self.published += 1
            if entry.spool_index is not None:
                spool_upto = entry.spool_index
            else:
                self.inflight_live -= 1
        for topic, mid in list(self.retained_inflight.items()):
            if mid in done:
                del self.retained_inflight[topic]
                done.discard(mid)
                self.published += 1
        if spool_upto is not None:
            self._out.spool.ack_through(spool_upto)
        if done:
            # Keep only acks of tracked messages that wait behind an unacknowledged one
            # (QoS 0 sends are reported too, and would pile up).
            tracked = {e.mid for e in self._inflight}
            done &= tracked

    def _publish_retained(self) -> None:
        out = self._out
        with out.cond:
            todo = [
                (t, out.retained[t])
                for t in sorted(out.retained_dirty)
                if t not in self.retained_inflight
            ]
            out.retained_dirty.difference_update(t for t, _ in todo)
        # Status first, so `stopping`/`offline` leads what close() still sends.
        todo.sort(key=lambda item: item[0] != self._status_topic)
        for topic, payload in todo:
            sent = self._conn.publish(topic, payload, qos=1, retain=True)
            self.retained_inflight[topic] = sent.mid

    def _fill(self) -> None:
        """Hand ordered messages to paho, up to the in-flight limit."""
        out = self._out
        room = self._limit(out.receive_max) - len(self._inflight)
        if room <= 0 or not out.connected:
            return
        spool = out.spool
        with out.cond:
            # Checked together with the pop: a spill (under the same lock) moves the whole
            # live queue to the spool, so live messages never overtake spooled ones.
            batch = (
                [out.live.popleft() for _ in range(min(room, len(out.live)))]
                if spool.depth == 0
                else []
            )
        # Messages handed to paho after an unseen disconnect are kept by paho and re-sent
        # after the reconnect; they are tracked like any other in-flight message.
        for msg in batch:
            sent = self._conn.publish(msg.topic, msg.payload, qos=msg.qos, retain=False)
            self._inflight.append(_Inflight(sent.mid, msg, None))
            self.inflight_live += 1
        if batch or spool.depth == 0 or out.closing:
            return  # a closing publisher leaves what is spooled in the spool
        if any(e.spool_index is None for e in self._inflight):
            return  # live messages precede the spilled ones: let them settle first
        head = spool.head_index
        skip = sum(1 for e in self._inflight if e.spool_index is not None and e.spool_index >= head)
        for rec in spool.peek(room, skip=skip):
            sent = self._conn.publish(rec.topic, rec.payload, qos=rec.qos, retain=False)
            self._inflight.append(
                _Inflight(sent.mid, OutMessage(rec.topic, rec.payload, rec.qos), rec.index)
            )
