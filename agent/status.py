"""The agent's ``status`` messages and last wills, numbered in the order they supersede
each other (``protocol.Status.seq``).

A controller with several replicas may store two statuses of one device out of order (each
replica commits its own batches); ``seq`` lets it keep the newer. A last will is built when
the agent connects and carries that time as ``ts``, yet the broker publishes it after every
status sent on that connection: so each connection gets its own will, numbered after the
statuses built while that connection is (or was) the last one, and the next connection's
statuses come after it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent import __version__
from protocol import SCHEMA_VERSION, Status, StreamStatus, encode_checked
from protocol.messages import DeviceState, status_seq, will_seq


class StatusMessages:
    """Builds the status messages of one agent process (thread-safe)."""

    def __init__(
        self, device_id: str, clock: Callable[[], float], facts: Mapping[str, Any]
    ) -> None:
        self.device_id = device_id
        self.clock = clock
        self.started_at = clock()
        self.facts = dict(facts)
        self._count = itertools.count(1)  # next() is atomic under the GIL

    def status(
        self, state: DeviceState, streams: Sequence[StreamStatus], *, connection: int
    ) -> bytes:
        """A status built while ``connection`` (0 before the first) is the last one."""
        return self._encode(state, list(streams), status_seq(connection, next(self._count)))

    def will(self, connection: int) -> bytes:
        """The last will of connection number ``connection``: ``offline``, no streams (their
        models are not known at connect time; the retained ``reported`` state keeps them)."""
        return self._encode("offline", [], will_seq(connection))

    def _encode(self, state: DeviceState, streams: list[StreamStatus], seq: int) -> bytes:
        return encode_checked(
            Status(
                schema=SCHEMA_VERSION,
                device_id=self.device_id,
                state=state,
                ts=self.clock(),
                agent_version=__version__,
                started_at=self.started_at,
                streams=streams,
                facts=self.facts,
                seq=seq,
            ),
            fit=True,
        )
