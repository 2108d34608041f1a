"""The controller's one root exception and its subclasses.

Every message says what went wrong and what to do about it; the CLI prints only the
message (traceback with ``-v``).
"""

from __future__ import annotations


class ControllerError(Exception):
    """Root of every error the controller and its CLI raise on purpose."""


class ConfigError(ControllerError):
    """The configuration file is missing, malformed or has unknown/invalid keys."""


class DatabaseError(ControllerError):
    """The database cannot be reached, migrated or written."""


class BrokerError(ControllerError):
    """The MQTT broker cannot be started or reached."""


class MalformedMessageError(ControllerError):
    """An MQTT message does not follow the protocol or cannot be stored; it is counted and skipped."""


class ApiError(ControllerError):
    """The HTTP API answered with an error (the CLI shows the server's explanation)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ApiError):
    """The API refused the token (missing, unknown or revoked: 401; wrong role: 403)."""


class NotFoundError(ApiError):
    """The API has no such object (404)."""


class ConnectionFailedError(ApiError):
    """The controller's HTTP API cannot be reached."""


class RolloutError(ControllerError):
    """A rollout cannot be created or changed: unknown model or device, a selection that
    overlaps an active rollout, an invalid spec, or a state that does not allow the action.

    ``kind`` tells the API which status to answer: ``not_found`` (404), ``conflict`` (409)
    or ``invalid`` (422).
    """

    def __init__(self, message: str, *, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind
