"""The fleet simulator fetches bundles as an agent does: redirects followed (S3 storage answers
a download with a redirect to a presigned URL), size and sha256 checked (tools.simulator)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from tools.simulator.download import fetch_bundle

BUNDLE = bytes(range(256)) * 400
SHA = hashlib.sha256(BUNDLE).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/bundle":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BUNDLE)))
            self.end_headers()
            self.wfile.write(BUNDLE)
        elif self.path.startswith("/redirect/"):
            hops = int(self.path.rsplit("/", 1)[1])
            self.send_response(307)
            self.send_header("Location", "/bundle" if hops <= 1 else f"/redirect/{hops - 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server with ``handler`` on a thread; its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with _serving(_Handler) as url:
        yield url


def test_a_redirected_download_is_followed_and_checked(server: str) -> None:
    assert fetch_bundle(f"{server}/redirect/1", SHA, len(BUNDLE), retry_s=0) is None
    assert fetch_bundle(f"{server}/redirect/3", SHA, len(BUNDLE), retry_s=0) is None


def test_a_redirect_loop_fails_the_download_instead_of_hanging(server: str) -> None:
    assert fetch_bundle(f"{server}/redirect/50", SHA, len(BUNDLE), retry_s=0) == ("download_failed")


def test_the_bytes_are_checked_after_a_redirect(server: str) -> None:
    assert fetch_bundle(f"{server}/redirect/1", "0" * 64, len(BUNDLE), retry_s=0) == (
        "sha256_mismatch"
    )
    assert fetch_bundle(f"{server}/redirect/1", SHA, len(BUNDLE) + 1, retry_s=0) == (
        "size_mismatch"
    )
    assert fetch_bundle(f"{server}/missing", SHA, len(BUNDLE), retry_s=0) == "http_404"


class _KeepAlive(_Handler):
    """HTTP/1.1 with keep-alive, but a connection is closed after its second response
    without saying so, as a server's idle timeout does."""

    protocol_version = "HTTP/1.1"
    served: ClassVar[dict[int, int]] = {}
    """Responses per connection (by the client's port)."""

    def do_GET(self) -> None:
        super().do_GET()
        key = self.client_address[1]
        self.served[key] = self.served.get(key, 0) + 1
        if self.served[key] >= 2:
            self.close_connection = True


def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    with _serving(_KeepAlive) as server:
        results = [fetch_bundle(f"{server}/bundle", SHA, len(BUNDLE), retry_s=0) for _ in range(5)]
    assert results == [None] * 5
    assert sum(_KeepAlive.served.values()) == 5
    assert len(_KeepAlive.served) == 3, "two downloads per connection, then a new one"
