"""The broker address every party writes the same way: ``mqtt://host[:port]`` (plain TCP,
default port 1883) or ``mqtts://host[:port]`` (TLS, default port 8883).

A path or a query is refused rather than half-used.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from protocol.errors import ProtocolError

__all__ = ["BROKER_URL_HINT", "BrokerAddress", "parse_broker_url"]

BROKER_URL_HINT = "use mqtt://host:port or mqtts://host:port (TLS)"
PLAIN_PORT, TLS_PORT = 1883, 8883


class BrokerAddress(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` → address; :class:`ProtocolError`
    naming what is wrong otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ProtocolError(f"broker URL {url!r} is malformed ({err}); {BROKER_URL_HINT}") from err
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ProtocolError(
            f"broker URL {url!r}: unknown scheme {parts.scheme!r}; {BROKER_URL_HINT}"
        )
    if not parts.hostname:
        raise ProtocolError(f"broker URL {url!r} has no host name; {BROKER_URL_HINT}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProtocolError(
            f"broker URL {url!r}: a broker URL has no path or query; {BROKER_URL_HINT}"
        )
    if port == 0:
        raise ProtocolError(f"broker URL {url!r}: port 0 is not a port; {BROKER_URL_HINT}")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname, port=port or (TLS_PORT if tls else PLAIN_PORT), tls=tls
    )
