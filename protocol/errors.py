"""The one root exception of the protocol package."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A topic or message does not follow the edgefleet protocol.

    The message names what is wrong (the field path or the topic part) so that a
    third-party subscriber can log it and move on.
    """
