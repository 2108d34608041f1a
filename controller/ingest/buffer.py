"""The bounded FIFO between the MQTT thread (producer) and the ingest writer thread."""

from __future__ import annotations

import threading
import time
from collections import deque

from controller.fleet.writes import Received


class MessageBuffer:
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
