"""The agent's bounded on-disk FIFO of MQTT messages for when the broker cannot be reached.

Modules: ``records`` (one spooled message and its framing), ``segments`` (the segment file
format: header, scan, torn-tail repair), ``recovery`` (``spool.json`` and reopening a spool
folder after a restart or a crash) and ``queue`` (:class:`~agent.spool.queue.Spool`, the
thread-safe queue the publisher uses).

Durability (fsync policy): an fsync per append would cap the spool far below the 1000 msg/s
an agent can produce on an SD card, so appends are grouped. ``Spool.append`` writes each
record with one ``write(2)`` into the page cache and returns; ``Spool.sync`` (called by the
owner at most every ``sync_interval_s`` through ``sync_if_due``, and by ``close``) fsyncs the
segment, the folder and the state file. Therefore:

- process crash / ``kill -9``: no appended record is lost (the kernel has it). Acks of at most
  the last ``sync_interval_s`` may be forgotten, so those records are delivered again:
  duplicates, which consumers drop by ``seq``.
- power loss / kernel crash: records appended in at most the last ``sync_interval_s`` (the
  unsynced batch) may be lost or torn (torn ones are detected and skipped); acks and the
  ``dropped`` count may go back by the same interval.

Size bound: ``max_bytes`` caps the bytes of pending records (framing included, see
:func:`~agent.spool.records.encode_record`). Appending a record that would exceed it first
drops the OLDEST pending records one by one, counting each in ``dropped``.
"""

from __future__ import annotations

from agent.errors import AgentError


class SpoolError(AgentError):
    """The on-disk spool cannot be opened or written."""


__all__ = ["SpoolError"]
