"""A round-robin TCP balancer on a free loopback port, for tests of controller replicas: what
a Kubernetes Service or a load balancer is in front of them (a backend that refuses the
connection is skipped, like an endpoint that is not ready)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Sequence


class TcpBalancer:
    def __init__(self, backends: Sequence[int]) -> None:
        self.backends = list(backends)
        self._next = itertools.count()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._stopped = False
        self.connections = 0
        self._live: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="balancer", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stopped = True
        self._sock.close()

    def cut(self) -> int:
        """Close every connection passing now, both sides, without a word: what a dropped
        link does (an MQTT broker then publishes the client's last will). Returns how many."""
        with self._lock:
            live, self._live = self._live, []
        for pair in live:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        return len(live)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        start = next(self._next)
        for i in range(len(self.backends)):
            port = self.backends[(start + i) % len(self.backends)]
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
        return None

    def _serve(self, client: socket.socket) -> None:
        backend = self._connect()
        if backend is None:
            client.close()
            return
        self.connections += 1
        backend.settimeout(None)
        with self._lock:
            self._live.append((client, backend))
        threading.Thread(target=_pipe, args=(backend, client), daemon=True).start()
        _pipe(client, backend)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        src.close()


def main(argv: Sequence[str]) -> None:
    """``python -m tests.tcp_balancer BACKEND_PORT...``: print the port, balance until killed
    (benchmarks run it as its own process so its byte copying does not share their GIL)."""
    balancer = TcpBalancer([int(p) for p in argv])
    print(balancer.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
