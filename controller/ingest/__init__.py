"""MQTT ingestion: device messages decoded on the MQTT thread, written in batches.

- ``decode``: topic and payload to a storable message (or RejectedMessage: kind, reason,
  field), within the bounds of ``protocol.limits``;
- ``rejects``: the refused-message log, one line per device per minute;
- ``stats``: counters of every outcome and their snapshot (``/metrics``);
- ``buffer``: the bounded queue between the MQTT thread and the writer thread;
- ``writer``: the ``Ingestor`` (``handle`` on the MQTT thread, the batch writer thread).

The rows themselves are written by ``controller.fleet.writes``.
"""
