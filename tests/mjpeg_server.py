"""A small MJPEG-over-HTTP camera for tests: ``multipart/x-mixed-replace`` on loopback.

Serves JPEG frames (``cv2.imencode`` of a video's frames) at ``/stream.mjpg`` in a loop at a fixed
rate, one thread per client. ``stop()`` closes the listening socket AND every open stream, so a
reader sees the camera vanish; a new server can then be started on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

BOUNDARY = "frame"


def encode_video(path: Path, *, limit: int = 30, quality: int = 80) -> list[bytes]:
    """The first ``limit`` frames of ``path`` as JPEG bytes."""
    import cv2

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        out: list[bytes] = []
        while len(out) < limit:
            ok, image = cap.read()
            if not ok:
                break
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise RuntimeError(f"cannot JPEG-encode frame {len(out)} of {path}")
            out.append(buf.tobytes())
    finally:
        cap.release()
    if not out:
        raise RuntimeError(f"no frames in {path}")
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: MjpegServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests do not want a line per request."""

    def do_GET(self) -> None:
        owner = self.server.owner
        if self.path.split("?", 1)[0] != "/stream.mjpg":
            self.send_error(404, "only /stream.mjpg is served")
            return
        owner._register(self.connection)
        try:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            period = 1.0 / owner.fps
            due = time.monotonic()
            i = 0
            while not owner._stopping.is_set():
                jpeg = owner.frames[i % len(owner.frames)]
                part = (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(jpeg)}\r\n\r\n"
                ).encode()
                self.wfile.write(part + jpeg + b"\r\n")
                self.wfile.flush()
                owner.frames_sent += 1
                i += 1
                due += period
                owner._stopping.wait(max(0.0, due - time.monotonic()))
        except OSError:
            pass  # client went away or the server closed the socket under us
        finally:
            owner._unregister(self.connection)


class MjpegServer:
    """MJPEG camera on ``127.0.0.1:port`` (``port=0``: a free one); use as a context manager."""

    def __init__(self, frames: Sequence[bytes], *, port: int = 0, fps: float = 30.0) -> None:
        self.frames = list(frames)
        self.fps = fps
        self.frames_sent = 0
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> MjpegServer:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self._requested_port), self)
        self._requested_port = self.port  # a restart reuses the same port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mjpeg-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open stream (the reader sees EOF / a reset)."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def _register(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def _unregister(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
