"""A paho client that reads its socket in large chunks: the controller's ingestion path.

paho-mqtt 2.x reads every packet with two to five ``recv`` calls (the command byte, the
remaining length one byte at a time, then the body) and handles one packet per ``select``.
A controller replica receives a fleet's telemetry (1,000 messages a second at 10,000
devices), so those system calls were a large part of its MQTT thread's CPU (py-spy during a
10,000-device rollout: paho's read path 36-47 % of a replica's busy samples).

:class:`ChunkedReadClient` overrides the one place paho reads its socket (``_sock_recv``):
it asks the socket for up to :data:`READ_CHUNK` bytes and serves paho's small reads from
that buffer; ``loop_read`` goes on handling packets while the buffer holds any (``select``
cannot see bytes already read). Closing the socket drops the buffer. Everything else,
reconnects, TLS (an SSL socket's ``recv`` returns decrypted bytes) and flow control, is
paho's own. Measured in ``bench/mqtt_reads.py`` against paho's client in the same process.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK = 65536
"""Bytes asked of the socket per read."""


class ChunkedReadClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with buffered socket reads (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._chunk_pos = 0
        self.socket_reads = 0
        """``recv`` calls on the socket so far (for tests and benchmarks)."""

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._chunk_pos >= len(self._chunk):
            data = super()._sock_recv(READ_CHUNK)  # raises what paho expects (BlockingIOError…)
            self.socket_reads += 1
            if len(data) <= bufsize:  # b"" (closed) included
                return data
            self._chunk, self._chunk_pos = data, 0
        start = self._chunk_pos
        end = min(len(self._chunk), start + bufsize)
        piece = self._chunk[start:end]
        if end >= len(self._chunk):
            self._chunk, self._chunk_pos = b"", 0
        else:
            self._chunk_pos = end
        return piece

    @property
    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._chunk) - self._chunk_pos

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # Packets already in the buffer: select() would not wake for them.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered and self._sock is not None:
            rc = super().loop_read(1)
        return rc

    def _sock_close(self) -> None:
        self._chunk, self._chunk_pos = b"", 0
        super()._sock_close()
