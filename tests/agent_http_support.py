"""Helpers of tests/test_agent_http.py: an HTTP client for the agent's local endpoint,
the golden image and its face, and the real daemon with ``[http]`` enabled."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import pytest

from protocol import Detections, decode
from tests.agent_proc import start_agent, stop_agent
from tests.ota_support import FACE
from tests.waiting import wait_for

GOLDEN = Path(__file__).resolve().parent / "data" / "astronaut.png"
"""The golden image: scikit-image's astronaut, one face (FACE)."""
TOKEN = "s3cret-token-0123456789abcdef"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", self.headers
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    content_type: str | None = None,
    token: str | None = TOKEN,
    timeout: float = 30.0,
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def detect(port: int, query: str = "", body: bytes | None = None, **kw: Any) -> Answer:
    return call(
        port,
        "POST",
        f"/detect{query}",
        GOLDEN.read_bytes() if body is None else body,
        content_type=kw.pop("content_type", "image/png"),
        **kw,
    )


def faces(answer: Answer) -> Detections:
    assert answer.status == 200, answer.body
    return decode(answer.body, Detections)  # the protocol's strict decoder


def assert_the_face(message: Detections) -> None:
    label, score, box = FACE
    found = [d for d in message.detections if d.label == label]
    assert len(found) == 1, message.detections
    assert found[0].score == pytest.approx(score, abs=0.02)
    assert found[0].box == pytest.approx(box, abs=0.01)


def jpeg(rgb: Any, *, scale: float = 1.0) -> bytes:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if scale != 1.0:
        bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return data.tobytes()


def expect_continue(port: int, path: str, length: int | None, body: bytes) -> bytes:
    """POST with ``Expect: 100-continue`` on a raw socket: the headers first, the body only
    after ``100 Continue``; everything the server sent until it closed (or 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {length or len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        received = sock.recv(65536)
        if received.startswith(b"HTTP/1.1 100 "):
            sock.sendall(body)
        while chunk := sock.recv(65536):
            received += chunk
        return received


def http_block(port: int, extra: str = "") -> str:
    return f'[http]\nenabled = true\nport = {port}\ntoken = "{TOKEN}"\n{extra}\n'


def listening(pid: int) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


@contextmanager
def running_agent(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_agent(config, log)
    try:
        yield proc
        code, _ = stop_agent(proc)
        assert code == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            return call(port, "GET", "/readyz", token=None, timeout=2).status == 200
        except OSError:
            return False

    wait_for(ready, timeout=30, what=lambda: f"/readyz\n{log.read_text(errors='replace')[-2000:]}")
