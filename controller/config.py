"""Controller configuration: one TOML file, validated strictly.

Unknown keys and values out of bounds are rejected with their name and line (the bounds
are declared on the fields, so docs/config/controller.schema.json carries them); relative
paths are resolved against the config file's folder (or the working directory without a
file); secrets can come from the environment (``EDGEFLEET_DB_URL``,
``EDGEFLEET_BROKER_PASSWORD``, ``EDGEFLEET_EMBEDDED_BROKER_PASSWORD``,
``EDGEFLEET_S3_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from controller.errors import ConfigError
from protocol.config_file import (
    BrokerClientSection,
    ConfigSection,
    ConfigSource,
    check_broker_table,
    parse_toml,
    schema_document,
    to_struct,
)
from protocol.constraints import (
    Count,
    ListenPort,
    PositiveInt,
    PositiveSeconds,
    Seconds,
    WholeSeconds,
)
from protocol.errors import ProtocolError

CONFIG_VERSION: Literal[1] = 1
DB_URL_ENV = "EDGEFLEET_DB_URL"
BROKER_PASSWORD_ENV = "EDGEFLEET_BROKER_PASSWORD"  # noqa: S105 - a variable name, not a secret
EMBEDDED_PASSWORD_ENV = "EDGEFLEET_EMBEDDED_BROKER_PASSWORD"  # noqa: S105 - a variable name
S3_SECRET_ENV = "EDGEFLEET_S3_SECRET_ACCESS_KEY"  # noqa: S105 - a variable name
CONFIG_ENV = "EDGEFLEET_CONFIG"
DEFAULT_DATA_DIR = "edgefleet-data"
SQLITE_FILE = "controller.db"
DOCS = "docs/controller.md, 'Configuration'"

SharedGroup = Annotated[
    str, Meta(pattern=r"^[^/+#]+$", description="plain name without '/', '+' or '#'")
]


class DatabaseConfig(ConfigSection, frozen=True, kw_only=True):
    url: str | None = None
    """SQLAlchemy URL; default ``sqlite:///{data_dir}/controller.db``. PostgreSQL:
    ``postgresql+psycopg://user@host:5432/db`` (prefer the EDGEFLEET_DB_URL variable for passwords)."""
    echo: bool = False
    """Log every SQL statement (debugging only)."""
    pool_size: PositiveInt = 5
    """PostgreSQL connection pool size."""


class BrokerConfig(BrokerClientSection, frozen=True, kw_only=True):
    url: str | None = None
    """``mqtt://host:port`` or ``mqtts://host:port``; unset = start the embedded broker."""
    session_expiry_s: WholeSeconds = 3600
    """How long the broker keeps the controller's session (and queues QoS 1 messages) while it is down."""
    shared_group: SharedGroup | None = None
    """Subscribe with MQTT v5 shared subscriptions (``$share/{group}/...``) so replicas split the load."""
    adopt_sessions: bool = False
    """With ``shared_group``: take over the MQTT session of a replica that died (its last will)
    so its queued messages are ingested. Opt-in: it needs one login that may use every
    replica's client id, which the shipped Mosquitto config (use_username_as_clientid, a
    login per replica) refuses; see docs/scaling.md."""


class EmbeddedBrokerConfig(ConfigSection, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    """Listen address; keep loopback unless agents on other machines must connect."""
    port: ListenPort = 1883
    """0 = any free port (printed on start)."""
    username: str = "edgefleet"
    password: str | None = None
    """Unset = generated once and kept in ``{data_dir}/broker/password``."""
    mosquitto: str | None = None
    """Path of the mosquitto executable; unset = search PATH, /usr/sbin, /usr/local/sbin."""


class IngestConfig(ConfigSection, frozen=True, kw_only=True):
    queue_size: PositiveInt = 100_000
    """Bound of the in-memory queue between the MQTT thread and the database writer."""
    batch_size: PositiveInt = 2000
    """Write a batch when this many messages are waiting ..."""
    flush_interval_s: PositiveSeconds = 0.1
    """... or when the oldest waiting message is this old."""
    enqueue_timeout_s: Seconds = 2.0
    """When the queue is full, block the MQTT thread this long (back-pressure), then drop and count."""


class RetentionConfig(ConfigSection, frozen=True, kw_only=True):
    telemetry_raw_s: PositiveSeconds = 2 * 86400
    """Keep raw telemetry samples this long ..."""
    telemetry_downsample_s: Annotated[
        WholeSeconds, Meta(description="bucket in seconds; 0 = delete old raw samples")
    ] = 300
    """... then average them into buckets of this many seconds (0 = delete them instead) ..."""
    telemetry_downsampled_s: PositiveSeconds = 30 * 86400
    """... and keep the averaged samples this long."""
    events_s: PositiveSeconds = 30 * 86400
    """Keep device events this long."""
    interval_s: PositiveSeconds = 600
    """How often the retention job runs."""


class ApiConfig(ConfigSection, frozen=True, kw_only=True):
    bind: str = "127.0.0.1"
    port: ListenPort = 8080
    """0 = any free port (printed on start)."""
    public_url: str | None = None
    """URL printed for operators; defaults to ``http://{bind}:{port}`` (``https://`` with TLS)."""
    tls_cert_file: str | None = None
    """Serve HTTPS with this PEM certificate (chain); together with ``tls_key_file``."""
    tls_key_file: str | None = None
    """The certificate's private key (PEM, unencrypted); together with ``tls_cert_file``."""
    tls_client_ca_file: str | None = None
    """mTLS: require a client certificate signed by this CA (PEM); needs ``tls_cert_file``."""
    auth_max_failures: Annotated[
        Count, Meta(description="failed attempts; 0 = no limit on failed token attempts")
    ] = 10
    """Failed bearer-token attempts from one client address within ``auth_window_s`` before
    that address gets 429 for ``auth_window_s`` (0 = no limit)."""
    auth_window_s: PositiveSeconds = 60.0
    """The window for counting failed token attempts, and how long an address stays blocked."""


class S3StorageConfig(ConfigSection, frozen=True, kw_only=True):
    bucket: str | None = None
    """Bucket of the bundles (it must exist); required with ``models.storage = "s3"``."""
    prefix: Annotated[str, Meta(pattern=r"^([^/].*/)?$", description="empty or ending in '/'")] = (
        "edgefleet/bundles/"
    )
    """Key prefix: objects are ``{prefix}sha256/{ab}/{sha256}.efb``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, ...: ``https://s3.example.net:9000``); unset = AWS."""
    region: str | None = None
    """Region name (AWS); unset = boto3's default (AWS_DEFAULT_REGION, ~/.aws/config)."""
    access_key_id: str | None = None
    """Unset = boto3's credential chain (AWS_ACCESS_KEY_ID, ~/.aws/credentials, an IAM role)."""
    secret_access_key: str | None = None
    """Together with ``access_key_id``; prefer the EDGEFLEET_S3_SECRET_ACCESS_KEY variable."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` for most self-hosted S3-compatible stores without wildcard DNS."""
    presign_expiry_s: Annotated[int, Meta(ge=10, le=604_800, description="seconds")] = 900
    """How long a presigned download URL handed to a device stays valid (resumes ask again)."""


class ModelsConfig(ConfigSection, frozen=True, kw_only=True):
    storage: Literal["local", "database", "s3"] | None = None
    """Where bundles are kept: ``local`` (``blob_dir`` on this controller's disk), ``database``
    (1 MiB chunks in the database, every replica reaches them) or ``s3`` (devices download
    through presigned URLs); unset = ``database`` on PostgreSQL, ``local`` on SQLite."""
    blob_dir: str | None = None
    """Where uploaded bundles are stored (``local``) or staged while uploaded; default ``{data_dir}/blobs``."""
    chunk_bytes: Annotated[int, Meta(ge=65_536, le=67_108_864, description="bytes")] = 1_048_576
    """Size of the rows a bundle is split into with ``storage = "database"``."""
    cache_bytes: Annotated[int, Meta(ge=0, le=4_294_967_296, description="bytes")] = 67_108_864
    """With ``storage = "database"``: recently downloaded bundles each replica keeps in
    memory (least recently used out; bundles over a quarter of it are never kept); 0: none."""
    s3: S3StorageConfig = msgspec.field(default_factory=S3StorageConfig)
    """The bucket with ``storage = "s3"``."""
    max_bundle_bytes: Annotated[int, Meta(ge=1, description="bytes")] = 2 * 1024**3
    """Largest accepted upload (``POST /api/v1/models``); larger ones get 413."""
    trusted_keys: list[str] = msgspec.field(default_factory=list)
    """Ed25519 public keys (PEM files); when set, uploads must carry a signature one of them verifies."""


class RolloutsConfig(ConfigSection, frozen=True, kw_only=True):
    enabled: bool = True
    """Drive rollouts and publish desired states from this controller (PostgreSQL: only the
    replica holding the rollout lock does, the others stand by)."""
    tick_interval_s: PositiveSeconds = 1.0
    """How often the rollout engine looks at every live rollout."""


class ControllerConfig(ConfigSection, frozen=True, kw_only=True):
    config_version: Literal[1] = CONFIG_VERSION
    data_dir: str = DEFAULT_DATA_DIR
    """SQLite database, embedded broker files and the dev token live here."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    embedded_broker: EmbeddedBrokerConfig = msgspec.field(default_factory=EmbeddedBrokerConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    rollouts: RolloutsConfig = msgspec.field(default_factory=RolloutsConfig)


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config plus where it came from; paths resolve against ``base_dir``."""

    config: ControllerConfig
    path: Path | None
    base_dir: Path

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.config.data_dir)

    @property
    def blob_dir(self) -> Path:
        """Where model bundles are stored (``models.blob_dir`` or ``{data_dir}/blobs``)."""
        configured = self.config.models.blob_dir
        return self.resolve(configured) if configured else self.data_dir / "blobs"

    @property
    def bundle_storage(self) -> Literal["local", "database", "s3"]:
        """``models.storage``, or its default: ``database`` on PostgreSQL, ``local`` on SQLite."""
        configured = self.config.models.storage
        if configured is not None:
            return configured
        return "database" if self.database_url.startswith("postgresql") else "local"

    @property
    def database_url(self) -> str:
        """The configured URL, or the SQLite file under the data dir."""
        if self.config.database.url:
            return self.config.database.url
        return f"sqlite:///{self.data_dir / SQLITE_FILE}"

    @property
    def client_id(self) -> str:
        return self.config.broker.client_id or f"edgefleet-controller-{socket.gethostname()}"[:64]


_USERINFO_PASSWORD = re.compile(r"(://[^/?#@:]*):[^/?#]*@")


def hide_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``."""
    return _USERINFO_PASSWORD.sub(r"\1:***@", url)


def parse_config(text: str, *, source: str = "<config>") -> ControllerConfig:
    """Parse and validate TOML text; raise ConfigError naming the file, line and key."""
    src = ConfigSource(source, text)
    try:
        raw = parse_toml(src)
    except ProtocolError as err:
        raise ConfigError(str(err)) from err
    return _convert(raw, src)


def convert_config(raw: dict[str, Any], *, source: str = "<config>") -> ControllerConfig:
    """Validate an already parsed mapping (TOML table or dict built in code)."""
    return _convert(raw, ConfigSource(source))


def _convert(raw: dict[str, Any], src: ConfigSource) -> ControllerConfig:
    try:
        config = to_struct(raw, ControllerConfig, src, docs=DOCS)
        url = config.broker.url
        if url is not None:
            _refuse_credentials(url, src)
        check_broker_table(config.broker, url, src)
    except ProtocolError as err:
        raise ConfigError(str(err)) from err
    _check(config, src)
    return config


def _refuse_credentials(url: str, src: ConfigSource) -> None:
    """A password in ``broker.url`` would be logged: refuse it before anything shows the URL."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{src.at('broker', 'url')}: broker.url {hide_password(url)!r}: put no credentials "
            "in the URL (it is logged): use broker.username and broker.password (or "
            "EDGEFLEET_BROKER_PASSWORD)"
        )


def _check(config: ControllerConfig, src: ConfigSource) -> None:
    """Cross-field checks msgspec cannot express; raise ConfigError saying what to fix."""
    db_url = config.database.url
    if db_url is not None and not db_url.startswith(("sqlite", "postgresql")):
        raise ConfigError(
            f"{src.at('database', 'url')}: database.url {hide_password(db_url)!r}: use "
            "sqlite:///PATH or postgresql+psycopg://user@host/db (or leave it unset for SQLite "
            "under data_dir)"
        )
    api = config.api
    if (api.tls_cert_file is None) != (api.tls_key_file is None):
        raise ConfigError(
            f"{src.at('api', 'tls_cert_file' if api.tls_key_file is None else 'tls_key_file')}: "
            "api.tls_cert_file and api.tls_key_file go together: set both to "
            "serve HTTPS (`edgefleet certs issue NAME --kind server` writes a pair) or neither "
            "for HTTP"
        )
    _check_models(config.models, src)
    if api.tls_client_ca_file is not None and api.tls_cert_file is None:
        raise ConfigError(
            f"{src.at('api', 'tls_client_ca_file')}: api.tls_client_ca_file (client "
            "certificates) needs HTTPS: set api.tls_cert_file and api.tls_key_file too"
        )


def _check_models(models: ModelsConfig, src: ConfigSource) -> None:
    s3 = models.s3
    if models.storage == "s3" and not s3.bucket:
        raise ConfigError(
            f'{src.at("models", "storage")}: models.storage = "s3" needs models.s3.bucket: '
            "name an existing bucket (and models.s3.endpoint_url for a store other than AWS)"
        )
    url = s3.endpoint_url
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{src.at('models', 's3')}: models.s3.endpoint_url {url!r}: use an http:// or "
            "https:// URL (e.g. https://minio.example.net:9000)"
        )


def config_schema() -> dict[str, Any]:
    """JSON Schema of the controller's TOML file (docs/config/controller.schema.json)."""
    return schema_document(
        ControllerConfig, name="controller", title="edgefleet controller configuration"
    )


def _with_env(config: ControllerConfig, env: dict[str, str] | os._Environ[str]) -> ControllerConfig:
    replace = msgspec.structs.replace
    if env.get(DB_URL_ENV):
        config = replace(config, database=replace(config.database, url=env[DB_URL_ENV]))
    if env.get(BROKER_PASSWORD_ENV):
        config = replace(config, broker=replace(config.broker, password=env[BROKER_PASSWORD_ENV]))
    if env.get(S3_SECRET_ENV):
        s3 = replace(config.models.s3, secret_access_key=env[S3_SECRET_ENV])
        config = replace(config, models=replace(config.models, s3=s3))
    if env.get(EMBEDDED_PASSWORD_ENV):
        config = replace(
            config,
            embedded_broker=replace(config.embedded_broker, password=env[EMBEDDED_PASSWORD_ENV]),
        )
    return config


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> LoadedConfig:
    """Read and validate a config file (or the defaults without one), apply env overrides.

    ``overrides`` maps dotted keys (``database.url``, ``api.port``) to values from the
    command line; they win over the file and the environment.
    """
    environ = os.environ if env is None else env
    p: Path | None = None
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"config file {p} not found; copy the example from docs/controller.md or "
                "leave --config out to run with the defaults"
            ) from None
        except OSError as err:
            raise ConfigError(f"cannot read config file {p}: {err.strerror}") from err
        config = parse_config(text, source=source)
    else:
        config = convert_config({}, source=source)
    config = _with_env(config, environ)
    if overrides:
        merged = msgspec.to_builtins(config)
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = merged
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        config = convert_config(merged, source=f"{source} + command line")
    base = p.resolve().parent if p is not None else Path.cwd()
    return LoadedConfig(config=config, path=p.resolve() if p else None, base_dir=base)
