"""The controller's composition root: builds every part from the config and runs them.

``build_controller(config)`` gives a ``Controller``; ``start()`` runs it in background
threads (for tests and in-process demos, ``stop()`` ends it), ``serve()`` runs the HTTP
server on the calling thread until SIGINT/SIGTERM (``edgefleet controller serve``).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.api import create_app
from controller.api.auth import AuthLimiter
from controller.api.credentials import EnrolmentTarget
from controller.api.tls import check_api_tls
from controller.blobstore import hosting_from_config
from controller.broker import DEFAULT_PORT, EmbeddedBroker, port_configured
from controller.config import ControllerConfig, LoadedConfig, convert_config
from controller.db.session import Database
from controller.errors import ControllerError
from controller.fleet.credentials import broker_users
from controller.fleet.retention import RetentionResult, apply_retention
from controller.fleet.tokens import create_token, revoke_tokens_named
from controller.ingest.decode import INGESTED_KINDS
from controller.ingest.writer import Ingestor
from controller.mqtt import MqttSettings, MqttSubscriber
from controller.replicas import SessionHandover, build_subscriber
from controller.rollouts.engine import RolloutEngine
from controller.rollouts.publisher import DesiredPublisher
from controller.rollouts.runner import RolloutRunner
from protocol.bundle import key_id
from protocol.topics import status_topic

log = logging.getLogger(__name__)

NO_TRUSTED_KEYS = (
    "no trusted signing key: devices enrolled now refuse every model update "
    "(no_trusted_keys); make one with `edgefleet keys generate --out keys` and serve with "
    "--trusted-key keys/signing.pub (or models.trusted_keys)"
)
DEV_TOKEN_NAME = "dev"  # noqa: S105 - the name of the token, not a secret
DEV_TOKEN_FILE = "dev-token"  # noqa: S105 - a file name


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """How agents (and this controller) reach the MQTT broker."""

    url: str
    username: str | None
    password: str | None
    embedded: bool


class Controller:
    """Database + migrations, (embedded) broker, MQTT ingestion, retention job, rollouts
    (engine + desired-state publisher), HTTP API."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        clock: Callable[[], float] = time.time,
        mqtt_port_explicit: bool = False,
    ) -> None:
        """``mqtt_port_explicit``: the embedded broker's port came from the command line
        (a taken port is then an error, not a reason to take a free one)."""
        self.loaded = loaded
        cfg = loaded.config
        self.config = cfg
        self.clock = clock
        self.tls = check_api_tls(loaded)  # before anything is created: a bad file stops here
        self.db = Database.from_url(
            loaded.database_url, echo=cfg.database.echo, pool_size=cfg.database.pool_size
        )
        self.ingestor = Ingestor(
            db=self.db,
            queue_size=cfg.ingest.queue_size,
            batch_size=cfg.ingest.batch_size,
            flush_interval_s=cfg.ingest.flush_interval_s,
            enqueue_timeout_s=cfg.ingest.enqueue_timeout_s,
            clock=clock,
        )
        self.embedded_broker: EmbeddedBroker | None = None
        if cfg.broker.url is None:
            eb = cfg.embedded_broker
            self.embedded_broker = EmbeddedBroker(
                workdir=loaded.data_dir / "broker",
                host=eb.host,
                port=eb.port,
                username=eb.username,
                password=eb.password,
                mosquitto=eb.mosquitto,
                port_fallback=eb.port == DEFAULT_PORT
                and not mqtt_port_explicit
                and not port_configured(loaded.path),
                device_users=self._device_users,
            )
        self.app = create_app(
            db=self.db,
            ingest_snapshot=self.ingestor.snapshot,
            clock=clock,
            auth_limiter=AuthLimiter(
                max_failures=cfg.api.auth_max_failures, window_s=cfg.api.auth_window_s
            ),
        )
        self.app.state.models = hosting_from_config(loaded, self.db)
        self.app.state.enrolment = EnrolmentTarget(
            broker_url=lambda: self.broker.url if self.broker.embedded else None,
            reload=self._reload_broker_users,
            forget_status=self._forget_status,
            trusted_keys=[loaded.resolve(k) for k in cfg.models.trusted_keys],
        )
        self.rollout_engine = RolloutEngine(self.db, base_url=self._rollout_base_url, clock=clock)
        self.rollouts: RolloutRunner | None = None
        if cfg.rollouts.enabled:
            self.rollouts = RolloutRunner(
                db=self.db,
                engine=self.rollout_engine,
                publisher=DesiredPublisher(self.db, publish=self._publish, clock=clock),
                interval_s=cfg.rollouts.tick_interval_s,
                clock=clock,
            )
            self.app.state.rollouts_wake = self.rollouts.wake
            self.app.state.rollouts_leadership = self.rollouts.leadership
        self.subscriber: MqttSubscriber | None = None
        self.handover: SessionHandover | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._retention_stop = threading.Event()
        self._retention_thread: threading.Thread | None = None
        self._started = False

    # --- facts for operators ----------------------------------------------------------

    @property
    def broker(self) -> BrokerInfo:
        if self.embedded_broker is not None:
            eb = self.embedded_broker
            return BrokerInfo(url=eb.url, username=eb.username, password=eb.password, embedded=True)
        b = self.config.broker
        return BrokerInfo(url=b.url or "", username=b.username, password=b.password, embedded=False)

    @property
    def api_url(self) -> str:
        """The HTTP API's URL (the real port once the server listens, with api.port 0);
        ``https://`` when api.tls_cert_file is set."""
        if self.config.api.public_url:
            return self.config.api.public_url.rstrip("/")
        host = self.config.api.bind
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self._bound_port()}"

    def _bound_port(self) -> int:
        servers = getattr(self._server, "servers", None) or []
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.config.api.port

    def describe(self) -> str:
        """What an operator needs: API URL, database, how agents connect."""
        b = self.broker
        lines = [
            f"edgefleet controller: API {self.api_url} (OpenAPI: {self.api_url}/docs)",
            f"  console: {self.api_url}/ui/ (log in with an API token)",
            f"  database: {self.db.url}",
        ]
        if self.tls is not None:
            lines.append(
                f"  HTTPS with {self.tls.cert_file}; clients trust the CA that signed it with "
                "--ca-file or EDGEFLEET_CA_FILE"
                + (" and need a client certificate (mTLS)" if self.tls.client_ca_file else "")
            )
        if b.embedded:
            # Never the password itself: this text goes to stdout and often to a journal.
            broker_dir = self.loaded.data_dir / "broker"
            where = (
                f"in {broker_dir / 'password'}"
                if self.config.embedded_broker.password is None
                else "as configured (embedded_broker.password)"
            )
            lines += [
                f"  embedded MQTT broker (mosquitto): {b.url}",
                f"  agents connect with: url = {b.url!r}, username = {b.username!r}, "
                f"password {where}",
                f"  (agent config snippet with the password: {broker_dir / 'agent.toml'})",
                "  a device's own login and agent config: edgefleet devices enroll DEVICE_ID",
            ]
        else:
            lines.append(f"  MQTT broker: {b.url}")
        hosting = self.app.state.models
        if hosting.trusted_keys:
            ids = ", ".join(key_id(k) for k in hosting.trusted_keys)
            lines.append(f"  model bundles must be signed with: {ids} (models.trusted_keys)")
        else:
            lines.append(f"  {NO_TRUSTED_KEYS}")
        return "\n".join(lines)

    # --- lifecycle --------------------------------------------------------------------

    def migrate(self) -> None:
        self.db.upgrade()

    def create_dev_token(self) -> str:
        """Replace the ``dev`` admin token; the new one is returned and kept in {data_dir}/dev-token."""
        now = self.clock()
        with self.db.begin() as conn:
            revoke_tokens_named(conn, DEV_TOKEN_NAME, now=now)
            _, token = create_token(conn, name=DEV_TOKEN_NAME, role="admin", now=now)
        _write_private(self.loaded.data_dir / DEV_TOKEN_FILE, token + "\n")
        return token

    def start_backend(self) -> None:
        """Everything but the HTTP server: migrations, broker, ingestion, retention, rollouts."""
        if self._started:
            return
        self.loaded.data_dir.mkdir(parents=True, exist_ok=True)
        self.migrate()
        try:
            if self.embedded_broker is not None:
                self.embedded_broker.start()
                _write_private(
                    self.loaded.data_dir / "broker" / "agent.toml",
                    self.embedded_broker.agent_config(),
                )
            self.ingestor.start()
            self.subscriber, self.handover = build_subscriber(
                settings=self._mqtt_settings(),
                kinds=INGESTED_KINDS,
                handle=self.ingestor.handle,
                wait_idle=self.ingestor.wait_idle,
                db=self.db,
                adopt=self.config.broker.adopt_sessions,
                on_connection_change=self._mqtt_changed,
                on_session=self.rollouts.on_session if self.rollouts is not None else None,
            )
            self.subscriber.start(wait=True)
            if self.rollouts is not None:
                self.rollouts.start()
            self._retention_stop.clear()
            self._retention_thread = threading.Thread(
                target=self._retention_loop, name="retention", daemon=True
            )
            self._retention_thread.start()
        except BaseException:
            self.stop()
            raise
        self._started = True

    def start(self, timeout: float = 15.0) -> None:
        """Start everything in background threads; returns once the API listens."""
        self.start_backend()
        server = self._make_server()
        self._server_thread = threading.Thread(target=server.run, name="http", daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ControllerError(
                    f"the HTTP API did not start on {self.config.api.bind}:{self.config.api.port}; "
                    "is the port in use? Set api.port (or --port) to a free one"
                )
            time.sleep(0.02)

    def serve(self, *, on_ready: Callable[[Controller], None] | None = None) -> None:
        """Run until SIGINT/SIGTERM: the HTTP server on this thread, the rest in the background."""
        self.start_backend()
        server = self._make_server()
        if on_ready is not None:
            ready = threading.Thread(
                target=self._notify_ready, args=(server, on_ready), daemon=True
            )
            ready.start()
        # uvicorn re-raises the signal that stopped it once it is done, with the handlers
        # that were installed before it ran; SIG_DFL for SIGTERM would kill the process
        # before stop() (embedded broker left running, queued messages lost).
        previous = _quiet_signals()
        try:
            server.run()
        except SystemExit as err:
            raise ControllerError(
                f"the HTTP API could not listen on {self.config.api.bind}:{self.config.api.port}; "
                "is the port in use? Set api.port (or --port) to a free one"
            ) from err
        finally:
            self.stop()
            _restore_signals(previous)

    def _notify_ready(self, server: Any, on_ready: Callable[[Controller], None]) -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            on_ready(self)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = True
            if self._server_thread is not None:
                self._server_thread.join(10)
                self._server_thread = None
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.subscriber is not None:
            if self.handover is not None:  # leave the shared group (controller.replicas)
                self.handover.leave(self.subscriber)
            else:
                self.subscriber.stop()
            self.subscriber = None
        self.ingestor.stop()
        self._retention_stop.set()
        if self._retention_thread is not None:
            self._retention_thread.join(10)
            self._retention_thread = None
        if self.embedded_broker is not None:
            self.embedded_broker.stop()
        self.db.dispose()
        self._started = False

    # --- parts ------------------------------------------------------------------------

    def _device_users(self) -> list[tuple[str, str]]:
        with self.db.begin() as conn:
            return broker_users(conn)

    def _reload_broker_users(self) -> None:
        if self.embedded_broker is not None:
            self.embedded_broker.refresh_users()

    def _forget_status(self, device_id: str) -> None:
        """Clear ``device_id``'s retained status (an empty retained message deletes it)."""
        if not self._publish([(status_topic(device_id), b"")])[0]:
            log.warning(
                "could not clear the retained status of revoked device %s (MQTT down?); a "
                "controller restart may show it online until its next status",
                device_id,
            )

    def _mqtt_settings(self) -> MqttSettings:
        b = self.config.broker
        info = self.broker
        return MqttSettings(
            url=info.url,
            client_id=self.loaded.client_id,
            username=info.username,
            password=info.password,
            ca_file=str(self.loaded.resolve(b.ca_file)) if b.ca_file else None,
            cert_file=str(self.loaded.resolve(b.cert_file)) if b.cert_file else None,
            key_file=str(self.loaded.resolve(b.key_file)) if b.key_file else None,
            keepalive_s=b.keepalive_s,
            connect_timeout_s=b.connect_timeout_s,
            session_expiry_s=b.session_expiry_s,
            shared_group=b.shared_group,
        )

    def _rollout_base_url(self) -> str | None:
        """Where devices download bundles (``api_url``); None while api.port 0 is not bound."""
        if not self.config.api.public_url and self._bound_port() == 0:
            return None
        return self.api_url

    def _publish(self, messages: Sequence[tuple[str, bytes]]) -> list[bool]:
        subscriber = self.subscriber
        if subscriber is None:
            return [False] * len(messages)
        return subscriber.publish_confirmed(messages, qos=1, retain=True)

    def _mqtt_changed(self, connected: bool) -> None:
        self.ingestor.stats.mqtt_connected = connected

    def _make_server(self) -> Any:
        import uvicorn

        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl_certfile": str(self.tls.cert_file), "ssl_keyfile": str(self.tls.key_file)}
            if self.tls.client_ca_file is not None:
                tls["ssl_ca_certs"] = str(self.tls.client_ca_file)
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        config = uvicorn.Config(
            self.app,
            host=self.config.api.bind,
            port=self.config.api.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            **tls,
        )
        self._server = uvicorn.Server(config)
        return self._server

    def run_retention(self) -> RetentionResult:
        r = self.config.retention
        return apply_retention(
            self.db.begin,
            now=self.clock(),
            telemetry_raw_s=r.telemetry_raw_s,
            telemetry_downsample_s=r.telemetry_downsample_s,
            telemetry_downsampled_s=r.telemetry_downsampled_s,
            events_s=r.events_s,
        )

    def _retention_loop(self) -> None:
        while not self._retention_stop.is_set():
            try:
                result = self.run_retention()
            except Exception:
                log.exception(
                    "telemetry/event retention failed; retrying in %.0fs",
                    self.config.retention.interval_s,
                )
            else:
                if _any(result):
                    log.info("retention: %s", result)
            self._retention_stop.wait(self.config.retention.interval_s)


def _quiet_signals() -> dict[int, Any]:
    """Make SIGINT/SIGTERM no-ops (uvicorn installs its own while it runs)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _any(result: RetentionResult) -> bool:
    return any(
        (
            result.downsampled_rows,
            result.deleted_raw,
            result.deleted_downsampled,
            result.deleted_events,
        )
    )


def _write_private(path: Path, text: str) -> None:
    """Write a secret file (mode 0600) by temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def build_controller(
    config: LoadedConfig | ControllerConfig | dict[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> Controller:
    """A Controller from a loaded config, a ControllerConfig, a plain dict or the defaults.

    ``base_dir`` resolves relative paths (data_dir, TLS files); default: the working dir.
    """
    if isinstance(config, LoadedConfig):
        loaded = config
    else:
        if config is None:
            cfg = convert_config({})
        elif isinstance(config, dict):
            cfg = convert_config(config, source="<dict>")
        else:
            cfg = config
        loaded = LoadedConfig(config=cfg, path=None, base_dir=(base_dir or Path.cwd()).resolve())
    return Controller(loaded, clock=clock)
