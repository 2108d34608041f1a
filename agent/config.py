"""Agent configuration: one TOML file, validated strictly.

Unknown keys and values out of bounds are rejected with their name and line (the bounds
are declared on the fields, so docs/config/agent.schema.json carries them); relative paths
are resolved against the config file's folder; secrets can come from the environment
(``EDGEFLEET_BROKER_PASSWORD``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from agent.errors import ConfigError
from agent.motion import MotionConfig
from inference import models
from inference.errors import ModelError
from protocol import ProtocolError, validate_device_id, validate_stream_name
from protocol.broker import parse_broker_url
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
    Fraction,
    Port,
    PositiveInt,
    PositiveSeconds,
    Seconds,
    WholeSeconds,
)
from protocol.limits import MAX_STREAMS

CONFIG_VERSION: Literal[1] = 1
PASSWORD_ENV = "EDGEFLEET_BROKER_PASSWORD"  # noqa: S105 - a variable name, not a secret
DOCS = "README, 'Agent configuration'"

TopicPrefix = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$(?!\n)",
        description="plain topic prefix such as homeassistant (letters, digits, _ - and /)",
    ),
]


class BrokerConfig(BrokerClientSection, frozen=True, kw_only=True):
    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""
    reconnect_max_s: Annotated[
        float,
        Meta(ge=1.0, le=300.0, description="longest wait between connection attempts, seconds"),
    ] = 10.0
    """Longest wait between two attempts to reach the broker: the delay starts at 1 s and
    doubles per failed attempt up to this, each drawn with jitter from its upper half, so
    the agent is back at most this long after the broker is."""

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.url).tls

    @property
    def host(self) -> str:
        return parse_broker_url(self.url).host

    @property
    def port(self) -> int:
        return parse_broker_url(self.url).port


class SpoolConfig(ConfigSection, frozen=True, kw_only=True):
    max_bytes: Annotated[int, Meta(ge=4096, description="bytes")] = 64 * 1024 * 1024
    """Cap of the on-disk detection spool; when full the oldest messages are dropped (and counted)."""


class TelemetryConfig(ConfigSection, frozen=True, kw_only=True):
    interval_s: PositiveSeconds = 10.0


class MetricsConfig(ConfigSection, frozen=True, kw_only=True):
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: Port = 9108


class DriftConfig(ConfigSection, frozen=True, kw_only=True):
    """Per-stream drift KPI: PSI of the detection scores against the active model's baseline."""

    baseline_size: Annotated[int, Meta(ge=10, description="detections")] = 1000
    """Detections the active model's baseline histogram is learned from (kept in the state
    dir, so a restart with the same model keeps its baseline)."""
    window: Annotated[int, Meta(ge=10, description="detections")] = 500
    """Most recent detections compared with the baseline (``score_psi`` in telemetry)."""


class WatchdogConfig(ConfigSection, frozen=True, kw_only=True):
    """systemd watchdog (``WatchdogSec=`` in the unit); inactive outside systemd."""

    stall_s: PositiveSeconds = 20.0
    """A running stream whose last finished inference is older than this withholds the
    watchdog ping, so systemd restarts a stuck detector. Keep it above the slowest stream's
    frame interval (``fps`` cap) and below the unit's ``WatchdogSec``."""


class HomeAssistantConfig(ConfigSection, frozen=True, kw_only=True):
    """Home Assistant MQTT discovery (opt-in): an object-count sensor and a "detected"
    binary sensor per stream, with availability from the status topic."""

    enabled: bool = False
    prefix: TopicPrefix = "homeassistant"
    """Home Assistant's discovery prefix."""
    off_delay_s: WholeSeconds = 5
    """The binary sensor turns off this long after the last frame with detections
    (0 = only a frame without detections turns it off)."""


class SnapshotsConfig(ConfigSection, frozen=True, kw_only=True):
    """Camera snapshots (opt-in): the latest frame with a detection, boxes and labels drawn,
    as a retained JPEG per stream on ``edgefleet/v1/{device}/snapshot/{stream}`` (and the raw
    image on ``.../jpeg`` for Home Assistant's camera with ``[homeassistant] enabled``)."""

    enabled: bool = False
    interval_s: Annotated[float, Meta(ge=1.0, le=86400.0, description="seconds")] = 30.0
    """At most one snapshot per stream per this many seconds."""
    max_bytes: Annotated[int, Meta(ge=5000, le=180_000, description="bytes")] = 100_000
    """Largest JPEG: a bigger one is encoded again at a lower quality, then at half the size;
    one still bigger is dropped (counted in ``edgefleet_agent_snapshots_total``)."""
    quality: Annotated[int, Meta(ge=30, le=95, description="JPEG quality")] = 80
    """JPEG quality of the first try."""


HttpToken = Annotated[
    str,
    Meta(
        min_length=16,
        max_length=256,
        pattern=r"^[!-~]+$(?!\n)",
        description="16-256 visible ASCII characters, e.g. `openssl rand -hex 24`",
    ),
]


class HttpConfig(ConfigSection, frozen=True, kw_only=True):
    """Local HTTP inference (opt-in, docs/http.md): POST a JPEG or PNG, get its detections in
    the MQTT detections shape. Requests never starve the camera streams: a bounded queue
    (503 with Retry-After when full) and their own low-priority inference threads."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    """Address to listen on; keep loopback unless other hosts must reach it (then set a token)."""
    port: Port = 8090
    token: HttpToken | None = None
    """Bearer token every request except ``/healthz`` and ``/readyz`` must carry; better
    ``token_file``, which keeps it out of the config."""
    token_file: str | None = None
    """File whose first line is the token; relative to the config file."""
    max_queue: Annotated[int, Meta(ge=1, le=64, description="requests")] = 4
    """Requests waiting for an inference thread; one more is answered 503 with Retry-After."""
    max_concurrency: Annotated[int, Meta(ge=1, le=8, description="threads")] = 1
    """Requests inferred at the same time (each thread has its own copy of the model)."""
    max_body_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024, description="bytes")] = (
        10 * 1024 * 1024
    )
    """Largest image body; a bigger one is answered 413 before it is read."""


class OtaConfig(ConfigSection, frozen=True, kw_only=True):
    """Over-the-air model updates (docs/ota.md): desired state from the controller."""

    enabled: bool = True
    """Act on the controller's desired state; false = ignore it and run the config's models."""
    trusted_keys: list[str] = msgspec.field(default_factory=list)
    """ed25519 public keys (PEM, ``signing.pub``) a bundle must be signed with; relative paths
    are resolved against the config file. Empty: every desired model is refused
    (reason ``no_trusted_keys``)."""
    probation_s: Annotated[
        Seconds, Meta(description="seconds; 0 = commit right after the swap")
    ] = 60.0
    """How long a new model is watched after the swap before it is committed (errors, frame
    rate, and the old model in the shadow on sampled frames)."""
    min_agreement: Fraction = 0.8
    """The health gate fails (``shadow_agreement``) when the candidate's box agreement (F1)
    with the current model, on the same frames, is below this with the stated confidence."""
    max_latency_ratio: Annotated[float, Meta(gt=0.0)] = 2.0
    """The health gate fails (``shadow_latency``) when the candidate's paired median inference
    time is above this many times the current model's, with the stated confidence."""
    max_errors: Count = 0
    """Candidate inference errors (exceptions, NaN or infinite outputs) allowed in the shadow
    phase and in probation; one more fails it at once."""
    confidence: Annotated[float, Meta(ge=0.5, le=0.999)] = 0.95
    """Confidence level of the gate's intervals."""
    undecided: Literal["rollback", "commit"] = "rollback"
    """What happens when the shadow phase reaches ``shadow_max_s`` without enough evidence
    (e.g. the camera showed nothing): ``rollback`` refuses the model
    (``shadow_inconclusive``), ``commit`` swaps it in and keeps watching in probation."""
    shadow_max_s: Seconds = 120.0
    """Longest shadow phase; 0 skips it (the probation still pairs frames)."""
    shadow_interval_s: Seconds = 0.2
    """Least time between two paired frames (consecutive frames are near copies)."""
    shadow_cpu_share: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.25
    """Most of the inference thread's time the shadow model may take."""
    fps_factor: Annotated[Fraction, Meta(description="share; 0 disables the check")] = 0.5
    """Probation fails (``probation_fps``) when frames/s fall below this share of the old
    model's."""
    latency_factor: float | None = None
    """Removed: the gate compares paired latencies (``max_latency_ratio``); ignored."""
    detection_rate_factor: float | None = None
    """Removed: the gate compares boxes on the same frames (``min_agreement``); ignored."""
    psi_limit: float | None = None
    """Removed: a PSI between two models measures calibration, not health; the drift KPI
    (``[drift]``) still reports each model against its own baseline. Ignored."""
    download_retries: Count = 5
    """Consecutive download attempts without progress before ``download_failed``."""
    golden_latency_runs: PositiveInt = 10
    """Invokes timed for the manifest's latency budget during staging."""


class StreamConfig(ConfigSection, frozen=True, kw_only=True):
    name: str
    source: str
    """Video file path, ``v4l2:N`` / ``/dev/videoN`` / ``N`` for a camera, or an rtsp/http(s) URL."""
    model: str
    """Path of a model manifest (``*.json``) or ``builtin:NAME`` for a shipped model."""
    backend: Literal["litert", "tflite", "onnx", "tensorrt"] | None = None
    """Defaults to the manifest's runtime."""
    threads: PositiveInt = 1
    fps: Annotated[float, Meta(ge=0, description="frames per second; 0 = no cap")] = 0.0
    """Cap on inferred frames per second; 0 = as fast as frames come."""
    min_score: Fraction | None = None
    labels: list[str] = msgspec.field(default_factory=list)
    """Only publish these labels; empty = all."""
    loop: bool = True
    """Video files: start again at the end."""
    realtime: bool = True
    """Video files: play at the file's frame rate (like a camera); false = as fast as possible, no drops."""
    enabled: bool = True
    publish_empty: bool = True
    """Publish frames with no detections too (consumers see the stream is alive)."""
    reconnect_min_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 30.0
    decode_threads: Annotated[
        int, Meta(ge=0, le=16, description="FFmpeg decoder threads; 0 = FFmpeg chooses")
    ] = 1
    """Video files and network streams: FFmpeg decoder threads. One thread costs the least
    CPU per frame at camera resolutions (measured: 0.52 vs 0.65 ms per 640x480 frame, no
    decoder threads started); raise it only for streams one core cannot decode
    (high resolution at a high frame rate); 0 lets FFmpeg choose (one per core)."""
    motion: MotionConfig = msgspec.field(default_factory=MotionConfig)
    """Motion gating (``[streams.motion]``, agent.motion): infer only frames that changed."""


class BatchingConfig(ConfigSection, frozen=True, kw_only=True):
    """Cross-stream batching (agent.batching): streams sharing one model run as one batch."""

    mode: Literal["off", "auto", "always"] = "off"
    """``off``: every stream invokes its own model; ``auto``: batch where the start-up
    measurement found one batch faster than separate calls; ``always``: batch wherever the
    model can (the measurement is still logged)."""
    max_wait_ms: Annotated[float, Meta(ge=1, le=200, description="milliseconds (1-200)")] = 40.0
    """Longest a frame waits for the other streams' frames to fill the batch."""


class AgentConfig(ConfigSection, frozen=True, kw_only=True):
    config_version: Literal[1] = CONFIG_VERSION
    device_id: str
    state_dir: str = "/var/lib/edgefleet"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    ota: OtaConfig = msgspec.field(default_factory=OtaConfig)
    drift: DriftConfig = msgspec.field(default_factory=DriftConfig)
    watchdog: WatchdogConfig = msgspec.field(default_factory=WatchdogConfig)
    homeassistant: HomeAssistantConfig = msgspec.field(default_factory=HomeAssistantConfig)
    snapshots: SnapshotsConfig = msgspec.field(default_factory=SnapshotsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    streams: list[StreamConfig]


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config with every path resolved."""

    config: AgentConfig
    path: Path | None

    def resolve(self, value: str) -> Path:
        """Resolve a path from the config against the config file's folder."""
        return resolve_path(value, self.path.parent if self.path else Path.cwd())


def resolve_path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def resolve_model(value: str, base: Path) -> Path:
    """``builtin:NAME`` → the shipped manifest; otherwise a path relative to ``base``."""
    try:
        return models.resolve_model(value, base)
    except ModelError as err:
        raise ConfigError(str(err)) from err


def parse_config(text: str, *, source: str = "<config>") -> AgentConfig:
    """Parse and validate TOML text; raise ConfigError naming the file, line and key."""
    src = ConfigSource(source, text)
    try:
        config = to_struct(parse_toml(src), AgentConfig, src, docs=DOCS)
        check_broker_table(config.broker, config.broker.url, src)
    except ProtocolError as err:
        raise ConfigError(str(err)) from err
    try:
        validate_device_id(config.device_id)
    except ProtocolError as err:
        raise ConfigError(f"{src.at('device_id')}: {err}") from err
    _check_streams(config.streams, src)
    for i, s in enumerate(config.streams):
        if s.motion.enabled and s.motion.max_skip_s >= config.watchdog.stall_s:
            raise ConfigError(
                f"{src.at('streams', i, 'motion', 'max_skip_s')}: streams[{i}] ({s.name}): "
                f"max_skip_s {s.motion.max_skip_s:g} must be below watchdog.stall_s "
                f"{config.watchdog.stall_s:g}, or the watchdog takes a still scene for a stall"
            )
    if config.http.token is not None and config.http.token_file is not None:
        raise ConfigError(
            f"{src.at('http', 'token_file')}: set http.token or http.token_file, not both"
        )
    return config


def _check_streams(streams: list[StreamConfig], src: ConfigSource) -> None:
    """The stream rules msgspec cannot express: at least one, unique names, min <= max."""
    if not streams:
        raise ConfigError(
            f"{src.at('streams')}: no [[streams]] configured; add at least one stream with a "
            "source and a model"
        )
    if len(streams) > MAX_STREAMS:
        raise ConfigError(
            f"{src.at('streams')}: {len(streams)} [[streams]] configured; the protocol carries "
            f"at most {MAX_STREAMS} per device: run another agent (its own device id) for the rest"
        )
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        again = next(i for i, name in enumerate(names) if name in names[:i])
        raise ConfigError(
            f"{src.at('streams', again, 'name')}: stream names must be unique, got {names}"
        )
    for i, s in enumerate(streams):
        try:
            validate_stream_name(s.name)
        except ProtocolError as err:
            raise ConfigError(f"{src.at('streams', i, 'name')}: {err}") from err
        if s.reconnect_min_s > s.reconnect_max_s:
            raise ConfigError(
                f"{src.at('streams', i, 'reconnect_min_s')}: streams[{i}] ({s.name}): need "
                "reconnect_min_s <= reconnect_max_s"
            )


def config_schema() -> dict[str, Any]:
    """JSON Schema of agent.toml (``make schemas`` writes docs/config/agent.schema.json)."""
    return schema_document(AgentConfig, name="agent", title="edgefleet agent configuration")


REMOVED_OTA_KEYS = {
    "latency_factor": "use max_latency_ratio (a paired ratio on the same frames)",
    "detection_rate_factor": "use min_agreement (boxes compared on the same frames)",
    "psi_limit": "PSI between two models is no rollback reason any more; [drift] keeps the KPI",
}


def deprecations(config: AgentConfig) -> list[str]:
    """Sentences about keys that are accepted but no longer do anything."""
    return [
        f"ota.{key} is no longer used and is ignored: {why}; remove it from the config"
        for key, why in REMOVED_OTA_KEYS.items()
        if getattr(config.ota, key) is not None
    ]


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read, validate and resolve a config file; apply environment overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} not found; copy packaging/agent.example.toml and edit it"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from err
    config = parse_config(text, source=str(p))
    password = os.environ.get(PASSWORD_ENV)
    if password:
        config = msgspec.structs.replace(
            config, broker=msgspec.structs.replace(config.broker, password=password)
        )
    loaded = LoadedConfig(config=config, path=p.resolve())
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(config.broker, name)
        if value is not None and not loaded.resolve(value).is_file():
            raise ConfigError(f"{p}: broker.{name} {loaded.resolve(value)} does not exist")
    for key in config.ota.trusted_keys:
        if not loaded.resolve(key).is_file():
            raise ConfigError(
                f"{p}: ota.trusted_keys: {loaded.resolve(key)} does not exist; copy the "
                "controller's signing.pub there or fix the path"
            )
    token_file = config.http.token_file
    if token_file is not None and not loaded.resolve(token_file).is_file():
        raise ConfigError(
            f"{p}: http.token_file: {loaded.resolve(token_file)} does not exist; write the "
            "token there (e.g. `openssl rand -hex 24 > FILE`, mode 0600) or fix the path"
        )
    for s in config.streams:
        model = resolve_model(s.model, p.parent.resolve())
        if not model.is_file():
            raise ConfigError(
                f"{p}: stream {s.name!r}: model manifest {model} does not exist; point "
                "'model' at a manifest .json or use builtin:blazeface-short-int8"
            )
    return loaded


def source_uri(loaded: LoadedConfig, source: str) -> str:
    """A stream's source as the agent opens it: a relative video file path resolved against
    the config file's folder (``agent.app`` does the same); cameras and URLs as written."""
    if "://" in source or source.isdigit() or source.startswith(("v4l2:", "/dev/")):
        return source
    return str(loaded.resolve(source))


def check_sources(loaded: LoadedConfig) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` about the streams' sources on this machine (``check-config``).

    A video file that does not exist is an error. A camera device that does not exist is a
    warning: a USB camera may be plugged in later, and the agent keeps retrying it. Network
    streams are not contacted; a malformed source raises :class:`~agent.errors.SourceError`.
    """
    import sys

    from agent.capture import parse_source

    folder = loaded.path.parent if loaded.path else Path.cwd()
    errors: list[str] = []
    warnings: list[str] = []
    for s in loaded.config.streams:
        spec = parse_source(source_uri(loaded, s.source))
        if spec.kind == "file" and spec.path is not None:
            path = Path(spec.path)
            relative = (
                ""
                if Path(s.source).expanduser().is_absolute()
                else (
                    f" (the relative source {s.source!r} is resolved from the config file's "
                    f"folder {folder})"
                )
            )
            if not path.exists():
                errors.append(
                    f"stream {s.name!r}: video file {path} does not exist{relative}; fix "
                    "the stream's `source`"
                )
            elif not path.is_file():
                errors.append(f"stream {s.name!r}: video file {path} is not a regular file")
        node = spec.device_path
        if node is not None and sys.platform.startswith("linux") and not Path(node).exists():
            warnings.append(
                f"stream {s.name!r}: camera {node} does not exist now; the agent keeps "
                "retrying until it appears (list cameras with `v4l2-ctl --list-devices`)"
            )
    return errors, warnings
