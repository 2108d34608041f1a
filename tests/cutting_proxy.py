"""A TCP proxy on a free loopback port that cuts connections: what a flaky link between a
device and its bundle server does. Each accepted connection pops the next entry of
``cut_after`` (bytes of the answer to pass before closing both sides; none left = pass all)
and records the request head it forwarded, so tests see the ``Range`` a client resumed with.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class CuttingProxy:
    backend_port: int
    cut_after: list[int] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    """The first bytes of each request (decoded latin-1): request line and headers."""

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                cut = self.cut_after.pop(0) if self.cut_after else None
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: int | None) -> None:
        try:
            backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=10)
        except OSError:
            client.close()
            return
        up = threading.Thread(target=self._upstream, args=(client, backend), daemon=True)
        up.start()
        passed = 0
        try:
            while cut is None or passed < cut:
                data = backend.recv(65536)
                if not data:
                    break
                if cut is not None:
                    data = data[: cut - passed]
                client.sendall(data)
                passed += len(data)
        except OSError:
            pass
        finally:
            for s in (client, backend):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _upstream(self, client: socket.socket, backend: socket.socket) -> None:
        first = True
        try:
            while data := client.recv(65536):
                if first:
                    with self._lock:
                        self.heads.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
                    first = False
                backend.sendall(data)
        except OSError:
            pass
