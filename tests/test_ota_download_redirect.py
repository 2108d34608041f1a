"""The agent's bundle download follows redirects the way an S3-backed controller needs: 307
to a presigned http(s) URL, ``Range`` carried to the final URL so a cut download resumes
there, credentials left on the original host, and no redirect to another scheme."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.ota.download import DownloadError, download
from common.backoff import Backoff
from tests.cutting_proxy import CuttingProxy
from tests.range_server import RangeServerState, range_server


@contextmanager
def redirector(location: Callable[[], str], code: int = 307) -> Iterator[list[str]]:
    """An HTTP server answering every GET with ``code`` to ``location()``; yields the list of
    Authorization headers it saw, then its URL appended at index 0 of a second list."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(code)
            self.send_header("Location", location())
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        seen.append(f"http://127.0.0.1:{server.server_address[1]}/bundle")
        yield seen
    finally:
        server.shutdown()
        server.server_close()


def test_307_is_followed_and_a_cut_download_resumes_at_the_final_url(tmp_path: Path) -> None:
    body = bytes(range(256)) * 1200  # 307,200 bytes
    state = RangeServerState(body=body, cut_after=[100_000])
    with range_server(state) as blob_url:
        port = int(blob_url.split(":")[2].split("/")[0])
        proxy = CuttingProxy(port)
        try:
            with redirector(lambda: f"{proxy.url}/blob?X-Amz-Signature=abc") as seen:
                url = seen.pop(0)
                dest = download(
                    url,
                    tmp_path / "b.efb",
                    sha256=hashlib.sha256(body).hexdigest(),
                    size=len(body),
                    headers={"Authorization": "Bearer device-secret"},
                    backoff=Backoff(0.05, 0.1),
                )
        finally:
            proxy.close()
    assert dest.read_bytes() == body
    assert seen == ["Bearer device-secret", "Bearer device-secret"]  # asked again per attempt
    assert state.ranges == [None, "bytes=100000-"]  # the resume went to the final URL
    assert len(proxy.heads) == 2
    assert all("authorization" not in h.lower() for h in proxy.heads)  # left on its host


@pytest.mark.parametrize("code", [302, 308])
def test_other_redirect_codes_are_followed(tmp_path: Path, code: int) -> None:
    body = b"x" * 5000
    with (
        range_server(RangeServerState(body=body)) as blob_url,
        redirector(lambda: blob_url, code) as seen,
    ):
        dest = download(
            seen.pop(0), tmp_path / "b.efb", sha256=hashlib.sha256(body).hexdigest(), size=5000
        )
    assert dest.read_bytes() == body


@pytest.mark.parametrize("scheme", ["file", "ftp"])
def test_a_redirect_to_another_scheme_is_refused(tmp_path: Path, scheme: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not a bundle")
    target = secret.as_uri() if scheme == "file" else "ftp://127.0.0.1:9/secret"
    with redirector(lambda: target) as seen, pytest.raises(DownloadError) as caught:
        download(seen.pop(0), tmp_path / "b.efb", sha256="0" * 64, size=12, retries=0)
    assert caught.value.reason == "bad_redirect"
    assert "only http(s) redirects" in str(caught.value)
    assert not (tmp_path / "b.efb").exists()
