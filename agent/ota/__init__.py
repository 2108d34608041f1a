"""Device-side OTA building blocks: download, bundle verification, model store, golden check.

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
