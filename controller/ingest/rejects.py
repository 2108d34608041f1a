"""Logging of refused MQTT messages: one line per device per minute, naming the field.

A device that keeps sending a bad message (a bug in its agent, a third-party publisher)
must not flood the controller's log: the first refusal of a device is logged at once, the
next ones within ``every_s`` are only counted, and the next line says how many were left
out. The devices remembered are bounded (a flood of made-up device ids shares one entry).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from controller.ingest.decode import RejectedMessage

log = logging.getLogger(__name__)

REJECT_LOG_EVERY_S = 60.0
MAX_DEVICES = 10_000
"""Devices whose last log line is remembered; beyond it they share one entry."""
_SHARED = "*"


class RejectLog:
    """At most one warning per device per ``every_s`` for refused messages."""

    def __init__(
        self,
        *,
        every_s: float = REJECT_LOG_EVERY_S,
        max_devices: int = MAX_DEVICES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s = every_s
        self.max_devices = max_devices
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}
        """Device to (when its last line was logged, refusals left out since)."""
        self._lock = threading.Lock()
        self._pruned_at = float("-inf")

    def rejected(self, err: RejectedMessage) -> None:
        now = self.clock()
        with self._lock:
            key = self._key(err.device_id, now)
            last, suppressed = self._last.get(key, (float("-inf"), 0))
            if now - last < self.every_s:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
        more = (
            f" ({suppressed} more refused from this device in the last "
            f"{self.every_s:.0f}s were not logged)"
            if suppressed
            else ""
        )
        log.warning(
            "refused a %s message from device %r (%s, field %s): %s%s; nothing of it was "
            "stored: fix the publisher (bounds: docs/protocol.md, Bounds)",
            err.kind,
            err.device_id,
            err.reason,
            err.field,
            err,
            more,
        )

    def _key(self, device_id: str, now: float) -> str:
        if device_id in self._last or len(self._last) < self.max_devices:
            return device_id
        if now - self._pruned_at >= 1.0:  # at most once a second: O(devices)
            self._pruned_at = now
            for d in [d for d, (at, _) in self._last.items() if now - at >= self.every_s]:
                del self._last[d]
        return device_id if len(self._last) < self.max_devices else _SHARED
