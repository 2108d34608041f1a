"""Device side of OTA model updates (docs/ota.md).

Building blocks: ``download`` (resumable verified HTTP), ``bundle`` (signature, hashes,
compatibility, extraction), ``model_store`` (installed models per stream), ``probation``
(pure verdicts), ``health`` (per-frame samples), ``shadow``, ``gate`` and ``gate_policy``
(the paired health gate). The state machine: ``state`` (persisted files), ``services`` (the
injected I/O), ``deploy`` (the steps of one deployment), ``updater`` (one worker per stream)
and ``manager`` (desired in, reported and events out, restart recovery); ``wiring`` builds the
daemon's production services.

Every error raised on purpose is an :class:`OtaError` with a machine-readable ``reason`` (a
short snake_case code that goes into ``StreamReport.reason`` and events) and a sentence that
says what went wrong and what to do.
"""

from __future__ import annotations

from agent.errors import AgentError


class OtaError(AgentError):
    """An over-the-air model update step failed; ``reason`` is a machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


__all__ = ["OtaError"]
