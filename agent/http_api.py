"""The agent's local HTTP inference endpoint (``[http]``, off by default; docs/http.md).

``POST /detect`` an image (JPEG or PNG body with its ``Content-Type``) and get its
detections in the shape of the MQTT detections message, from the model a stream runs now
(``?stream=NAME``) or a model the device runs (``?model=name@version``); ``GET /models``,
``/healthz``, ``/readyz`` and ``/openapi.json``. Standard library only
(``http.server.ThreadingHTTPServer``): the agent stays light.

Requests never starve the camera streams: the checks that need no body (token, route,
model, media type, size, a place in the bounded queue) answer before the body is read, and
inference runs on its own low-priority threads with their own model copies
(:mod:`agent.http_infer` says why). Every error is JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.config import HttpConfig, LoadedConfig
from agent.errors import AgentError, ConfigError
from agent.http_images import MEDIA_TYPES, media_kind
from agent.http_infer import (
    InferencePool,
    Job,
    RequestFailed,
    ServedModel,
    lower_thread_priority,
    served_models,
)
from agent.http_openapi import OPEN_ROUTES, ROUTES, openapi_document
from agent.stream import StreamHandle

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 when the queue is full."""
BODY_TIMEOUT_S = 30.0
"""Longest a client may take to send its body (408 after)."""
INFER_TIMEOUT_S = 30.0
"""Longest a request waits for its inference (504 after)."""
IDLE_TIMEOUT_S = 5.0
"""A connection with no request for this long is closed."""
MAX_IDLE_CONNECTIONS = 64
"""Connections served at once beyond twice the queue: idle keep-alive ones count until
IDLE_TIMEOUT_S, and a client that opens a connection per request (schemathesis in CI did)
must not be refused while its earlier ones idle out. Each is a parked thread."""
LINGER_S = 2.0
LINGER_BYTES = 80 * 1024 * 1024
"""After refusing a body unread: drop what the client still sends, this long or this much."""


def read_token(config: HttpConfig, loaded: LoadedConfig) -> str | None:
    """The configured bearer token (``token``, or the first line of ``token_file``)."""
    if config.token_file is None:
        return config.token
    path = loaded.resolve(config.token_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"http.token_file: cannot read {path}: {err}") from err
    token = lines[0].strip() if lines else ""
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(
            f"http.token_file: {path} must hold a token of at least 16 visible ASCII "
            "characters on its first line (e.g. `openssl rand -hex 24`)"
        )
    return token


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], api: HttpApi, max_connections: int) -> None:
        self.api = api
        self._connections = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """At most ``max_connections`` at once; one more gets a bare 503 and is closed."""
        if not self._connections.acquire(blocking=False):
            body = b'{"detail":"too many connections; retry later"}'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        lower_thread_priority()  # parsing requests must not take CPU from the streams either
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


class HttpApi:
    """The endpoint: routes, checks, and the inference pool behind them."""

    def __init__(
        self,
        config: HttpConfig,
        *,
        device_id: str,
        catalog: Callable[[], list[ServedModel]],
        token: str | None,
        streams: Sequence[str],
    ) -> None:
        self.config = config
        self._catalog = catalog
        self._token = token.encode() if token is not None else None
        self._streams = tuple(streams)
        self.pool = InferencePool(
            device_id=device_id,
            catalog=catalog,
            max_queue=config.max_queue,
            max_concurrency=config.max_concurrency,
        )
        self.openapi = json.dumps(openapi_document(token=token is not None)).encode()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        cfg = self.config
        try:
            self._server = _Server(
                (cfg.bind, cfg.port),
                self,
                max_connections=MAX_IDLE_CONNECTIONS + 2 * self.pool.capacity,
            )
        except OSError as err:
            raise AgentError(
                f"[http]: cannot listen on {cfg.bind}:{cfg.port}: {err.strerror or err}; choose "
                "another http.port or http.bind, or set http.enabled = false"
            ) from err
        self.pool.start()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http-api"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self.pool.stop(timeout)

    # --- checks and answers (called from the handler threads) ----------------------------

    def authorized(self, header: str | None) -> bool:
        """Constant-time comparison of ``Authorization: Bearer TOKEN``."""
        if self._token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token)

    def choose(self, query: str) -> tuple[ServedModel, bool]:
        """The model a ``/detect`` query asks for, and whether it named a stream."""
        params = parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(params) - {"stream", "model"})
        if unknown:
            raise RequestFailed(400, f"unknown query parameter {unknown[0]!r}; use stream or model")
        if any(len(v) > 1 for v in params.values()):
            raise RequestFailed(400, "give stream or model once")
        stream = params.get("stream", [None])[0]
        model = params.get("model", [None])[0]
        served = self._catalog()
        if stream is not None and model is not None:
            raise RequestFailed(400, "give stream or model, not both")
        if stream is None and model is None:
            if len(self._streams) != 1:
                raise RequestFailed(
                    400,
                    "this device has several streams: choose one with ?stream=NAME "
                    f"({', '.join(self._streams)}) or a model with ?model=name@version",
                )
            stream = self._streams[0]
        if stream is not None:
            found = next((m for m in served if m.stream == stream), None)
            if found is None:
                raise RequestFailed(404, self._no_stream(stream))
            return found, True
        found = next((m for m in served if m.ref == model), None)
        if found is None:
            running = sorted({m.ref for m in served}) or ["none yet"]
            raise RequestFailed(
                404,
                f"no stream runs model {model!r}; models this device runs now: "
                f"{', '.join(running)} (GET /models)",
            )
        return found, False

    def _no_stream(self, stream: str) -> str:
        if stream in self._streams:
            return f"stream {stream!r} has no model running (it failed to start: see its status)"
        return f"no stream {stream!r} on this device; streams: {', '.join(self._streams)}"

    def models(self) -> dict[str, Any]:
        by_ref: dict[str, dict[str, Any]] = {}
        for m in self._catalog():
            entry = by_ref.get(m.ref)
            if entry is None:
                name, _, version = m.ref.partition("@")
                entry = by_ref[m.ref] = {
                    "model": m.ref,
                    "name": name,
                    "version": version,
                    "backend": m.backend,
                    "streams": [],
                    "labels": list(m.model_labels),
                    "input": {"width": m.input_size[0], "height": m.input_size[1]},
                }
            entry["streams"].append(m.stream)
        return {"models": list(by_ref.values())}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        refs = sorted({m.ref for m in self._catalog()})
        if not refs:
            return False, {
                "detail": "no stream runs a model yet (starting, or every stream failed)"
            }
        return True, {"status": "ready", "models": refs}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart
    server_version = "edgefleet-agent"
    timeout = IDLE_TIMEOUT_S
    _awaiting_continue = False
    _continued = False

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s %s", self.address_string(), format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict[str, Any], **kw: Any) -> None:
        self._send(status, json.dumps(data).encode(), **kw)

    def _fail(self, err: RequestFailed, *, close: bool = False) -> None:
        self._json(err.status, {"detail": err.detail}, headers=err.headers, close=close)

    def do_GET(self) -> None:
        self._dispatch("get")

    def do_POST(self) -> None:
        self._dispatch("post")

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` (curl, for bodies over 1 MiB): answer ``100 Continue``
        only once the request passed every check that needs no body, so a refused client
        never sends its image."""
        self._awaiting_continue = True
        return True

    def _continue(self) -> None:
        if self._awaiting_continue:
            self._awaiting_continue = False
            self._continued = True
            self.send_response_only(100)
            self.end_headers()

    def __getattr__(self, name: str) -> Any:
        """``do_PUT``, ``do_TRACE``, any other method: 405 with ``Allow`` (not 501)."""
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:].lower())
        raise AttributeError(name)

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        # A body this handler will not read must not be taken for the next request.
        unread = method != "get" or self.headers.get("Content-Length") not in (None, "0")
        waiting = self._awaiting_continue
        try:
            methods = ROUTES.get(path)
            if methods is None:
                raise RequestFailed(404, f"no route {path}; see /openapi.json")
            if path not in OPEN_ROUTES and not api.authorized(self.headers.get("Authorization")):
                raise RequestFailed(
                    401,
                    "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' with the "
                    "[http] token of the agent config",
                    {"WWW-Authenticate": 'Bearer realm="edgefleet-agent"'},
                )
            if method not in methods:
                raise RequestFailed(
                    405,
                    f"{path} takes {', '.join(m.upper() for m in methods)}",
                    {"Allow": ", ".join(m.upper() for m in methods)},
                )
            if path == "/detect":
                self._detect(api, url.query)
                return
            self._get(api, path)
        except RequestFailed as err:
            self._fail(err, close=unread)
            if unread and not (waiting and not self._continued):
                self._linger()  # (a client that waits for 100 Continue sends no body now)
        finally:
            self._awaiting_continue = self._continued = False

    def _linger(self) -> None:
        """Read and drop the rest of a refused body before closing (what web servers call a
        lingering close): a client still sending would otherwise get a connection reset
        instead of the answer."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            left = LINGER_BYTES
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def _get(self, api: HttpApi, path: str) -> None:
        if path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/readyz":
            ok, data = api.ready()
            self._json(200 if ok else 503, data)
        elif path == "/models":
            self._json(200, api.models())
        else:
            self._send(200, api.openapi)

    def _detect(self, api: HttpApi, query: str) -> None:
        model, by_stream = api.choose(query)
        content_type = self.headers.get("Content-Type")
        kind = media_kind(content_type)
        if kind is None:
            raise RequestFailed(
                415,
                f"Content-Type {content_type or '(none)'} is not accepted: send the image as "
                f"{' or '.join(sorted(set(MEDIA_TYPES) - {'image/jpg'}))}",
            )
        if self.headers.get("Transfer-Encoding"):
            raise RequestFailed(411, "send the image with a Content-Length, not chunked")
        length = self._content_length()
        limit = api.config.max_body_bytes
        if length > limit:
            raise RequestFailed(
                413, f"the body is {length} bytes; at most {limit} (http.max_body_bytes)"
            )
        if not api.pool.admit():
            raise RequestFailed(
                503,
                f"busy: {api.pool.capacity} requests are queued or running; retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            self._continue()
            body = self._read_body(length)
        except BaseException:
            api.pool.release()
            raise
        job = Job(body=body, kind=kind, model=model, by_stream=by_stream, received_ts=time.time())
        api.pool.submit(job)
        if not job.done.wait(INFER_TIMEOUT_S):
            raise RequestFailed(504, f"inference did not finish within {INFER_TIMEOUT_S:.0f} s")
        if job.error is not None:
            self._fail(job.error)
            return
        assert job.payload is not None
        self._send(200, job.payload)

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestFailed(411, "a Content-Length header is required")
        try:
            length = int(raw)
        except ValueError:
            raise RequestFailed(400, f"Content-Length {raw!r} is not a number") from None
        if length <= 0:
            raise RequestFailed(400, "the body is empty: send a JPEG or PNG image")
        return length

    def _read_body(self, length: int) -> bytes:
        deadline = time.monotonic() + BODY_TIMEOUT_S
        chunks: list[bytes] = []
        left = length
        try:
            while left > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise RequestFailed(
                        400, f"the body ended after {length - left} of {length} bytes"
                    )
                chunks.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            raise RequestFailed(
                408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s"
            ) from None
        return b"".join(chunks)


def start_http(loaded: LoadedConfig, streams: Sequence[StreamHandle]) -> HttpApi | None:
    """Start the endpoint when ``[http] enabled``; None otherwise (nothing listens)."""
    config = loaded.config
    cfg = config.http
    if not cfg.enabled:
        return None
    token = read_token(cfg, loaded)
    models_dir = loaded.resolve(config.state_dir) / "models"  # the OTA model store (agent.app)
    api = HttpApi(
        cfg,
        device_id=config.device_id,
        catalog=lambda: served_models(streams, models_dir),
        token=token,
        streams=[h.name for h in streams],
    )
    api.start()
    if token is None and cfg.bind not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "http: listening on %s:%d without a token: anyone who reaches it can run the "
            "models; set [http] token_file",
            cfg.bind,
            api.port,
        )
    log.info("http inference on http://%s:%d/detect", cfg.bind, api.port)
    return api


__all__ = ["HttpApi", "read_token", "start_http"]
