"""Fetching a bundle like an agent would, and checking its size and sha256.

All simulated devices of a process share one HTTP client (connection pool, TLS context):
a new client per download costs ~20 ms of CPU (loading the CA bundle), which was what
limited thousands of simulated downloads, not the controller."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from common.backoff import Backoff

_client: Any = None
_client_lock = threading.Lock()


def _shared_client() -> Any:
    global _client  # noqa: PLW0603 - one pool per process, made on first use
    import httpx

    with _client_lock:
        if _client is None:
            # Redirects are followed like the agent follows them: with S3 storage the
            # controller answers a download with a redirect to a presigned URL.
            _client = httpx.Client(
                timeout=30,
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
                follow_redirects=True,
                max_redirects=5,
            )
        return _client


def fetch_bundle(url: str, sha256: str, size: int, *, retry_s: float = 20.0) -> str | None:
    """Fetch the bundle, retrying connection errors and 5xx with backoff (0.2 s doubling up
    to 2 s) for ``retry_s``; the failure reason (``download_failed``, ``http_<status>``,
    ``size_mismatch``, ``sha256_mismatch``), or None when size and sha256 match."""
    import httpx

    deadline = time.monotonic() + retry_s
    backoff = Backoff(0.2, 2.0, jitter=0.0)
    while True:
        h = hashlib.sha256()
        got = 0
        problem: str | None = None
        try:
            with _shared_client().stream("GET", url) as resp:
                if resp.status_code != 200:
                    problem = f"http_{resp.status_code}"
                else:
                    for chunk in resp.iter_bytes():
                        h.update(chunk)
                        got += len(chunk)
        except httpx.HTTPError:
            problem = "download_failed"
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
        return None if h.hexdigest() == sha256 else "sha256_mismatch"
