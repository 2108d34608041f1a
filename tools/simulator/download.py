"""Fetching a bundle like an agent would, and checking its size and sha256.

Downloads use the standard library's ``http.client`` with one keep-alive connection per
download thread and server. Measured in a 10,000-device rollout (bench/rollout.py): with
httpx's shared client a 120 KiB download cost ~1 ms of the simulator's CPU, and with 64
downloads at once its pool bookkeeping (every connection scanned per request, under one
lock) was 13 % of the simulator's CPU; ``http.client`` costs ~0.35 ms. A new client per
download costs ~20 ms (loading the CA bundle): the TLS context is made once."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

from common.backoff import Backoff

MAX_REDIRECTS = 5
"""Redirects followed per download (S3 storage answers with one to a presigned URL)."""
_CHUNK = 1 << 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_local = threading.local()
_tls: ssl.SSLContext | None = None
_tls_lock = threading.Lock()


def _tls_context() -> ssl.SSLContext:
    global _tls  # noqa: PLW0603 - one context per process, made on first use
    with _tls_lock:
        if _tls is None:
            _tls = ssl.create_default_context()
        return _tls


def _connections() -> dict[tuple[str, str], http.client.HTTPConnection]:
    conns: dict[tuple[str, str], http.client.HTTPConnection] | None = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    return conns


def _connection(scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
    """This thread's connection to the server, and whether it is new."""
    conns = _connections()
    conn = conns.get((scheme, netloc))
    if conn is not None:
        return conn, False
    if scheme == "https":
        conn = http.client.HTTPSConnection(netloc, timeout=30, context=_tls_context())
    else:
        conn = http.client.HTTPConnection(netloc, timeout=30)
    conns[(scheme, netloc)] = conn
    return conn, True


def _drop(scheme: str, netloc: str) -> None:
    conn = _connections().pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


def _response(url: str) -> tuple[http.client.HTTPResponse, str, str]:
    """The response to ``GET url`` on this thread's connection (a kept-alive connection the
    server has closed meanwhile is replaced once); its scheme and server."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise http.client.InvalidURL(f"not an http(s) URL: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    while True:
        conn, new = _connection(parts.scheme, parts.netloc)
        try:
            conn.request("GET", target)
            return conn.getresponse(), parts.scheme, parts.netloc
        except (OSError, http.client.HTTPException):
            _drop(parts.scheme, parts.netloc)
            if new:
                raise


def _get(url: str) -> tuple[str | None, int, str]:
    """(the failure reason or None, bytes received, their sha256) of one download."""
    for _ in range(MAX_REDIRECTS + 1):
        resp, scheme, netloc = _response(url)
        try:
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                resp.read()
                if not location:
                    return "download_failed", 0, ""
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                resp.read()
                return f"http_{resp.status}", 0, ""
            h = hashlib.sha256()
            got = 0
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                got += len(chunk)
            return None, got, h.hexdigest()
        finally:
            if resp.will_close or not resp.isclosed():
                _drop(scheme, netloc)
    return "download_failed", 0, ""  # a redirect loop


def fetch_bundle(url: str, sha256: str, size: int, *, retry_s: float = 20.0) -> str | None:
    """Fetch the bundle, retrying connection errors and 5xx with backoff (0.2 s doubling up
    to 2 s) for ``retry_s``; the failure reason (``download_failed``, ``http_<status>``,
    ``size_mismatch``, ``sha256_mismatch``), or None when size and sha256 match."""
    deadline = time.monotonic() + retry_s
    backoff = Backoff(0.2, 2.0, jitter=0.0)
    while True:
        try:
            problem, got, digest = _get(url)
        except (OSError, http.client.HTTPException):
            problem, got, digest = "download_failed", 0, ""
        retryable = problem == "download_failed" or (problem or "").startswith("http_5")
        if retryable:
            delay = backoff.next()
            if time.monotonic() + delay < deadline:
                time.sleep(delay)
                continue
        if problem is not None:
            return problem
        if got != size:
            return "size_mismatch"
        return None if digest == sha256 else "sha256_mismatch"
