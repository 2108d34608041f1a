"""Agent configuration: one TOML file, validated strictly.

Unknown keys are rejected with their name and line; relative paths are resolved
against the config file's folder; secrets can come from the environment
(``EDGEFLEET_BROKER_PASSWORD``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from agent.errors import ConfigError
from inference import models
from inference.errors import ModelError
from protocol import ProtocolError, validate_device_id, validate_stream_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_VERSION: Literal[1] = 1
PASSWORD_ENV = "EDGEFLEET_BROKER_PASSWORD"  # noqa: S105 - a variable name, not a secret


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class BrokerConfig(_Section, frozen=True, kw_only=True):
    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""
    username: str | None = None
    password: str | None = None
    """Prefer the EDGEFLEET_BROKER_PASSWORD environment variable."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = None
    """Defaults to ``edgefleet-agent-{device_id}``."""
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class SpoolConfig(_Section, frozen=True, kw_only=True):
    max_bytes: int = 64 * 1024 * 1024
    """Cap of the on-disk detection spool; when full the oldest messages are dropped (and counted)."""


class TelemetryConfig(_Section, frozen=True, kw_only=True):
    interval_s: float = 10.0


class MetricsConfig(_Section, frozen=True, kw_only=True):
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9108


class DriftConfig(_Section, frozen=True, kw_only=True):
    """Per-stream drift KPI: PSI of the detection scores against the active model's baseline."""

    baseline_size: int = 1000
    """Detections the active model's baseline histogram is learned from (kept in the state
    dir, so a restart with the same model keeps its baseline)."""
    window: int = 500
    """Most recent detections compared with the baseline (``score_psi`` in telemetry)."""


class WatchdogConfig(_Section, frozen=True, kw_only=True):
    """systemd watchdog (``WatchdogSec=`` in the unit); inactive outside systemd."""

    stall_s: float = 20.0
    """A running stream whose last finished inference is older than this withholds the
    watchdog ping, so systemd restarts a stuck detector. Keep it above the slowest stream's
    frame interval (``fps`` cap) and below the unit's ``WatchdogSec``."""


class HomeAssistantConfig(_Section, frozen=True, kw_only=True):
    """Home Assistant MQTT discovery (opt-in): an object-count sensor and a "detected"
    binary sensor per stream, with availability from the status topic."""

    enabled: bool = False
    prefix: str = "homeassistant"
    """Home Assistant's discovery prefix."""
    off_delay_s: int = 5
    """The binary sensor turns off this long after the last frame with detections
    (0 = only a frame without detections turns it off)."""


class OtaConfig(_Section, frozen=True, kw_only=True):
    """Over-the-air model updates (docs/ota.md): desired state from the controller."""

    enabled: bool = True
    """Act on the controller's desired state; false = ignore it and run the config's models."""
    trusted_keys: list[str] = msgspec.field(default_factory=list)
    """ed25519 public keys (PEM, ``signing.pub``) a bundle must be signed with; relative paths
    are resolved against the config file. Empty: every desired model is refused
    (reason ``no_trusted_keys``)."""
    probation_s: float = 60.0
    """How long a new model is watched after the swap before it is committed (errors, frame
    rate, and the old model in the shadow on sampled frames)."""
    min_agreement: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.8
    """The health gate fails (``shadow_agreement``) when the candidate's box agreement (F1)
    with the current model, on the same frames, is below this with the stated confidence."""
    max_latency_ratio: Annotated[float, msgspec.Meta(gt=0.0)] = 2.0
    """The health gate fails (``shadow_latency``) when the candidate's paired median inference
    time is above this many times the current model's, with the stated confidence."""
    max_errors: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Candidate inference errors (exceptions, NaN or infinite outputs) allowed in the shadow
    phase and in probation; one more fails it at once."""
    confidence: Annotated[float, msgspec.Meta(ge=0.5, le=0.999)] = 0.95
    """Confidence level of the gate's intervals."""
    undecided: Literal["rollback", "commit"] = "rollback"
    """What happens when the shadow phase reaches ``shadow_max_s`` without enough evidence
    (e.g. the camera showed nothing): ``rollback`` refuses the model
    (``shadow_inconclusive``), ``commit`` swaps it in and keeps watching in probation."""
    shadow_max_s: Annotated[float, msgspec.Meta(ge=0.0)] = 120.0
    """Longest shadow phase; 0 skips it (the probation still pairs frames)."""
    shadow_interval_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.2
    """Least time between two paired frames (consecutive frames are near copies)."""
    shadow_cpu_share: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.25
    """Most of the inference thread's time the shadow model may take."""
    fps_factor: float = 0.5
    """Probation fails (``probation_fps``) when frames/s fall below this share of the old
    model's."""
    latency_factor: float | None = None
    """Removed: the gate compares paired latencies (``max_latency_ratio``); ignored."""
    detection_rate_factor: float | None = None
    """Removed: the gate compares boxes on the same frames (``min_agreement``); ignored."""
    psi_limit: float | None = None
    """Removed: a PSI between two models measures calibration, not health; the drift KPI
    (``[drift]``) still reports each model against its own baseline. Ignored."""
    download_retries: int = 5
    """Consecutive download attempts without progress before ``download_failed``."""
    golden_latency_runs: int = 10
    """Invokes timed for the manifest's latency budget during staging."""


class StreamConfig(_Section, frozen=True, kw_only=True):
    name: str
    source: str
    """Video file path, ``v4l2:N`` / ``/dev/videoN`` / ``N`` for a camera, or an rtsp/http(s) URL."""
    model: str
    """Path of a model manifest (``*.json``) or ``builtin:NAME`` for a shipped model."""
    backend: Literal["litert", "tflite", "onnx", "tensorrt"] | None = None
    """Defaults to the manifest's runtime."""
    threads: int = 1
    fps: float = 0.0
    """Cap on inferred frames per second; 0 = as fast as frames come."""
    min_score: float | None = None
    labels: list[str] = msgspec.field(default_factory=list)
    """Only publish these labels; empty = all."""
    loop: bool = True
    """Video files: start again at the end."""
    realtime: bool = True
    """Video files: play at the file's frame rate (like a camera); false = as fast as possible, no drops."""
    enabled: bool = True
    publish_empty: bool = True
    """Publish frames with no detections too (consumers see the stream is alive)."""
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0


class AgentConfig(_Section, frozen=True, kw_only=True):
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


_PATH_PART = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _locate(text: str, json_path: str, key: str | None) -> int | None:
    """Best-effort 1-based line of ``key`` (or the table) for a msgspec path like ``$.streams[1]``."""
    parts = [m.group(1) or int(m.group(2)) for m in _PATH_PART.finditer(json_path)]
    tables = [str(p) for p in parts if isinstance(p, str)]
    index = next((p for p in parts if isinstance(p, int)), 0)
    header = ".".join(tables)
    lines = text.splitlines()
    start, seen = 0, -1
    if header:
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped in (f"[{header}]", f"[[{header}]]"):
                seen += 1
                if seen == index:
                    start = i
                    break
        else:
            return None
    if key is None:
        return start + 1
    for i in range(start + (1 if header else 0), len(lines)):
        stripped = lines[i].strip()
        if stripped.startswith("[") and (header or i > start):
            break
        if re.match(rf"^{re.escape(key)}\s*=", stripped):
            return i + 1
    return None


def parse_config(text: str, *, source: str = "<config>") -> AgentConfig:
    """Parse and validate TOML text; raise ConfigError naming the key and line."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    try:
        config = msgspec.convert(raw, AgentConfig)
    except msgspec.ValidationError as err:
        msg = str(err)
        path_match = re.search(r"at `(\$[^`]*)`", msg)
        json_path = path_match.group(1) if path_match else "$"
        unknown = _UNKNOWN.search(msg)
        key = unknown.group(1) if unknown else json_path.rsplit(".", 1)[-1].split("[")[0]
        line = _locate(text, json_path if unknown else json_path.rsplit(".", 1)[0], key)
        where = f"{source}:{line}" if line else source
        if unknown:
            section = json_path.removeprefix("$").lstrip(".") or "top level"
            raise ConfigError(
                f"{where}: unknown key {key!r} in {section}; check the spelling against "
                "the documented keys (README, 'Agent configuration')"
            ) from err
        raise ConfigError(f"{where}: {msg}") from err
    _check(config, source)
    return config


def _check(config: AgentConfig, source: str) -> None:  # noqa: PLR0912 - one flat list of checks
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    try:
        validate_device_id(config.device_id)
        for stream in config.streams:
            validate_stream_name(stream.name)
    except ProtocolError as err:
        raise ConfigError(f"{source}: {err}") from err
    if not config.streams:
        fail("no [[streams]] configured; add at least one stream with a source and a model")
    names = [s.name for s in config.streams]
    if len(set(names)) != len(names):
        fail(f"stream names must be unique, got {names}")
    url = urlsplit(config.broker.url)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        fail(f"broker.url {config.broker.url!r}: use mqtt://host:port or mqtts://host:port")
    try:
        _ = url.port
    except ValueError:
        fail(f"broker.url {config.broker.url!r}: the port is not a number in 1-65535")
    if (config.broker.cert_file is None) != (config.broker.key_file is None):
        fail("broker.cert_file and broker.key_file go together: set both or neither")
    if config.broker.keepalive_s < 5:
        fail("broker.keepalive_s must be at least 5")
    if config.spool.max_bytes < 4096:
        fail("spool.max_bytes must be at least 4096")
    if config.telemetry.interval_s <= 0:
        fail("telemetry.interval_s must be > 0")
    if not 0 < config.metrics.port < 65536:
        fail("metrics.port must be in 1-65535")
    _check_ota(config.ota, fail)
    if config.drift.baseline_size < 10 or config.drift.window < 10:
        fail("drift.baseline_size and drift.window must be at least 10 detections")
    if config.watchdog.stall_s <= 0:
        fail("watchdog.stall_s must be > 0")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", config.homeassistant.prefix):
        fail(
            f"homeassistant.prefix {config.homeassistant.prefix!r} must be a plain topic "
            "prefix (letters, digits, _ - and /), e.g. homeassistant"
        )
    if config.homeassistant.off_delay_s < 0:
        fail("homeassistant.off_delay_s must be >= 0")
    for s in config.streams:
        where = f"streams[{s.name}]"
        if s.threads < 1:
            fail(f"{where}.threads must be >= 1")
        if s.fps < 0:
            fail(f"{where}.fps must be >= 0 (0 = no cap)")
        if s.min_score is not None and not 0 <= s.min_score <= 1:
            fail(f"{where}.min_score must be in 0..1")
        if not 0 < s.reconnect_min_s <= s.reconnect_max_s:
            fail(f"{where}: need 0 < reconnect_min_s <= reconnect_max_s")


def _check_ota(ota: OtaConfig, fail: Callable[[str], None]) -> None:
    if ota.probation_s < 0:
        fail("ota.probation_s must be >= 0 (0 = commit right after the swap)")
    if not 0 <= ota.fps_factor <= 1:
        fail("ota.fps_factor must be in 0..1 (0 disables the check)")
    if ota.download_retries < 0:
        fail("ota.download_retries must be >= 0")
    if ota.golden_latency_runs < 1:
        fail("ota.golden_latency_runs must be >= 1")


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
    for s in config.streams:
        model = resolve_model(s.model, p.parent.resolve())
        if not model.is_file():
            raise ConfigError(
                f"{p}: stream {s.name!r}: model manifest {model} does not exist; point "
                "'model' at a manifest .json or use builtin:blazeface-short-int8"
            )
    return loaded
