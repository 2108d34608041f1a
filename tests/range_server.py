"""A real threaded HTTP server on loopback that serves one blob with Range support.

Tests tell it to cut the connection after N bytes, to ignore Range, or to answer with an
error status, and read back what it saw (Range headers, bytes served).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class RangeServerState:
    body: bytes
    cut_after: list[int] = field(default_factory=list)
    """Per request, in order: close the connection after this many body bytes."""
    ignore_range: bool = False
    send_length: bool = True
    """False: no Content-Length, the body ends when the connection closes."""
    status: int | None = None
    """Answer every request with this status (no body) when set."""
    stall: threading.Event | None = None
    """When set: send ``stall_after`` bytes, then wait on this event before continuing."""
    stall_after: int = 0
    ranges: list[str | None] = field(default_factory=list)
    bytes_served: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.requests += 1
            header = self.headers.get("Range")
            state.ranges.append(header)
            cut = state.cut_after.pop(0) if state.cut_after else None
        if state.status is not None:
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = state.body
        start = 0
        match = _RANGE.match(header or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if state.send_length:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if cut is not None:
            payload = payload[:cut]
        sent = 0
        step = 4096
        while sent < len(payload):
            if state.stall is not None and sent >= state.stall_after:
                state.stall.wait(10)
            piece = payload[sent : sent + step]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                break
            sent += len(piece)
            with state.lock:
                state.bytes_served += len(piece)
        if cut is not None:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: RangeServerState


@contextmanager
def range_server(state: RangeServerState) -> Iterator[str]:
    """Serve ``state.body`` at ``http://127.0.0.1:PORT/blob`` while the block runs."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = state
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/blob"
    finally:
        if state.stall is not None:
            state.stall.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
