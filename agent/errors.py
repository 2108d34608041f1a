"""The agent's one root exception and its subclasses.

Every message says what went wrong and what to do about it; the CLI prints only the
message (traceback with ``-v``).
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration file is missing, malformed or has unknown/invalid keys."""


class SourceError(AgentError):
    """A camera/video source cannot be opened or read."""


class PublishError(AgentError):
    """The MQTT connection cannot be set up (bad URL, TLS files, credentials)."""
