"""Resumable, verified HTTP(S) download of a model bundle (standard library only).

The file is written to ``dest`` + ``.part``; an existing ``.part`` is resumed with a
``Range: bytes=N-`` request (a ``206`` whose ``Content-Range`` starts at ``N`` continues it,
a ``200`` means the server ignored the range and the download restarts from 0). The sha256
is computed while streaming (the kept prefix is re-hashed on resume), more bytes than the
expected size abort the download, connection errors / 5xx / short reads are retried with
backoff, and only a file whose size and sha256 match is fsynced and renamed to ``dest``.

Redirects (301/302/303/307/308) are followed to http(s) URLs only, at most 5 in a row: a
controller that keeps bundles in S3 answers 307 with a short-lived presigned URL. ``Range``
goes along to the final URL (resume works there); ``Authorization`` and ``Cookie`` do not
when the redirect leaves the original host. Every attempt starts at ``url`` again, so a
retry gets a fresh presigned URL.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.ota import OtaError
from common.atomic import move_into_place
from common.backoff import Backoff

__all__ = ["DownloadError", "download"]

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(OtaError):
    """A bundle download failed; ``reason`` says how (``http_404``, ``sha256_mismatch``, …)."""


class _Retryable(Exception):
    """A transient failure: try again after a backoff delay."""


_PRIVATE_HEADERS = ("Authorization", "Cookie")


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only; credentials stay on the original host."""

    max_redirections = 5

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = urlsplit(newurl)
        if target.scheme.lower() not in ("http", "https"):
            raise DownloadError(
                "bad_redirect",
                f"download of {req.full_url} was redirected to {target.scheme}:// (HTTP {code}); "
                "only http(s) redirects are followed: check the controller's models.storage",
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(req.full_url).netloc.lower() != target.netloc.lower():
            for name in _PRIVATE_HEADERS:
                new.remove_header(name)
                new.remove_header(name.capitalize())
        return new


_OPENER = urllib.request.build_opener(_RedirectHandler)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    headers: dict[str, str] | None = None,
    retries: int = 5,
    backoff: Backoff | None = None,
    timeout_s: float = 30,
    chunk: int = 65536,
    on_progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256`` and ``size``; return ``dest``.

    Name ``dest`` after the expected sha256 so a ``.part`` left by another bundle is never
    resumed. ``stop`` is checked between chunks and during backoff waits (a stalled read
    returns within ``timeout_s``). ``retries`` counts consecutive attempts without progress.

    Raises :class:`DownloadError` with ``reason`` ``cancelled`` (``stop`` was set),
    ``http_<status>`` (a 4xx answer, not retried), ``download_failed`` (retries used up),
    ``size_mismatch`` or ``sha256_mismatch`` (the ``.part`` file is deleted).
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    stop = stop if stop is not None else threading.Event()
    backoff = backoff if backoff is not None else Backoff(1.0, 30.0)
    expected = sha256.lower()
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError("bad_url", f"bundle URL {url!r} is not http(s); fix the desired state")
    attempt = 0
    while True:
        if stop.is_set():
            raise DownloadError("cancelled", f"download of {url} was cancelled")
        before = part.stat().st_size if part.exists() else 0
        try:
            digest = _attempt(
                url,
                part,
                size=size,
                headers=headers or {},
                timeout_s=timeout_s,
                chunk=chunk,
                on_progress=on_progress,
                stop=stop,
            )
            break
        except DownloadError as err:
            if err.reason == "size_mismatch":
                part.unlink(missing_ok=True)
            raise
        except _Retryable as err:
            if part.exists() and part.stat().st_size > before:
                attempt = 0  # progress was made: a flaky link still finishes
                backoff.reset()
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    "download_failed",
                    f"download of {url} failed after {attempt} attempt(s): {err}; check the "
                    "network and the controller's bundle server, the next try resumes",
                ) from err
            delay = backoff.next()
            log.warning("download of %s: %s; retrying in %.1f s", url, err, delay)
            if stop.wait(delay):
                raise DownloadError("cancelled", f"download of {url} was cancelled") from err
    _verify(part, digest.hexdigest(), url=url, sha256=expected, size=size)
    move_into_place(part, dest)
    return dest


def _verify(part: Path, digest: str, *, url: str, sha256: str, size: int) -> None:
    got_size = part.stat().st_size
    if got_size != size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            "size_mismatch",
            f"download of {url} has {got_size} bytes, expected {size}: the bundle on the "
            "server does not match the desired state; republish it",
        )
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            "sha256_mismatch",
            f"download of {url} has sha256 {digest}, expected {sha256}: the file was "
            "corrupted or tampered with; it was deleted, republish the bundle",
        )


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        left = length
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest


def _attempt(
    url: str,
    part: Path,
    *,
    size: int,
    headers: dict[str, str],
    timeout_s: float,
    chunk: int,
    on_progress: Callable[[int, int], None] | None,
    stop: threading.Event,
) -> hashlib._Hash:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return _hash_prefix(part, have)  # complete .part from an earlier run: verify it
    response = _open(url, part, have=have, size=size, headers=headers, timeout_s=timeout_s)
    with response:
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != have:
                part.unlink(missing_ok=True)
                raise _Retryable(
                    f"server answered range {have}- with Content-Range "
                    f"{response.headers.get('Content-Range')!r}"
                )
            total = match.group(3)
            if total != "*" and int(total) != size:
                raise _size_mismatch(url, int(total), size)
            mode = "ab"
            digest = _hash_prefix(part, have)
        elif status == 200:
            if have:
                log.info("server ignored Range for %s; restarting from 0", url)
            have = 0
            mode = "wb"
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) != size:
                raise _size_mismatch(url, int(length), size)
            digest = hashlib.sha256()
        else:
            raise _Retryable(f"unexpected HTTP {status}")
        _stream(
            response,
            part,
            digest,
            mode=mode,
            have=have,
            size=size,
            chunk=chunk,
            on_progress=on_progress,
            stop=stop,
            url=url,
        )
    return digest


def _size_mismatch(url: str, announced: int, size: int) -> DownloadError:
    return DownloadError(
        "size_mismatch",
        f"the server announces {announced} bytes for {url}, the desired state says {size}: "
        "the bundle on the server does not match the desired state; republish it",
    )


def _open(
    url: str, part: Path, *, have: int, size: int, headers: dict[str, str], timeout_s: float
) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 - http(s) checked
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response: http.client.HTTPResponse = _OPENER.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and have:
            total = re.fullmatch(r"bytes\s+\*/(\d+)", err.headers.get("Content-Range", "").strip())
            if total is not None and int(total.group(1)) != size:
                part.unlink(missing_ok=True)
                raise _size_mismatch(url, int(total.group(1)), size) from err
            part.unlink(missing_ok=True)  # our .part is stale: start over
            raise _Retryable(f"HTTP 416 for range {have}-") from err
        if err.code >= 500 or err.code in (408, 429):
            raise _Retryable(f"HTTP {err.code}") from err
        if 300 <= err.code < 400:  # urllib refused the target (not http(s), or a loop)
            raise DownloadError(
                "bad_redirect",
                f"download of {url} was redirected (HTTP {err.code}) to "
                f"{err.headers.get('Location')!r}, which is not followed: only http(s) "
                "redirects are, 5 at most; check the controller's models.storage",
            ) from err
        raise DownloadError(
            f"http_{err.code}",
            f"download of {url} failed with HTTP {err.code} {err.reason}: check the "
            "model reference and the controller's bundle store",
        ) from err
    except (OSError, http.client.HTTPException) as err:
        raise _Retryable(f"cannot connect: {err}") from err
    return response


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    digest: hashlib._Hash,
    *,
    mode: str,
    have: int,
    size: int,
    chunk: int,
    on_progress: Callable[[int, int], None] | None,
    stop: threading.Event,
    url: str,
) -> None:
    with part.open(mode) as out:
        try:
            while have < size:
                if stop.is_set():
                    raise DownloadError("cancelled", f"download of {url} was cancelled")
                try:
                    block = response.read(min(chunk, size - have + 1))
                except (OSError, http.client.HTTPException) as err:
                    raise _Retryable(f"connection lost after {have} bytes: {err}") from err
                if not block:
                    raise _Retryable(f"short read: got {have} of {size} bytes")
                if have + len(block) > size:
                    out.flush()
                    raise DownloadError(
                        "size_mismatch",
                        f"download of {url} sends more than the announced {size} bytes: the "
                        "bundle on the server does not match the desired state; republish it",
                    )
                out.write(block)
                digest.update(block)
                have += len(block)
                if on_progress is not None:
                    on_progress(have, size)
            # The server must not have more to send.
            try:
                extra = response.read(1)
            except (OSError, http.client.HTTPException):
                extra = b""
            if extra:
                raise DownloadError(
                    "size_mismatch",
                    f"download of {url} sends more than the announced {size} bytes: the bundle "
                    "on the server does not match the desired state; republish it",
                )
        finally:
            out.flush()
            os.fsync(out.fileno())
