"""Message types of the edgefleet protocol (JSON over MQTT v5).

Every message is a frozen msgspec Struct that rejects unknown fields and carries a
``schema`` version. Decoding is strict: a missing field, an unknown field or a wrong
type raises ProtocolError with the JSON path of the culprit.

Times are UNIX epoch seconds (float). Boxes are ``[xmin, ymin, xmax, ymax]`` normalized
to the original frame (0..1).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from protocol.errors import ProtocolError

SCHEMA_VERSION: Literal[1] = 1
"""Current version of every message schema. Bumped only on incompatible changes."""


class _Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    schema: Literal[1]


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


# --- status ---------------------------------------------------------------------------

DeviceState = Literal["online", "offline", "stopping"]
SourceState = Literal["starting", "running", "reconnecting", "failed", "ended", "stopped"]


class StreamStatus(_Part, frozen=True, kw_only=True):
    """State of one camera stream on the device."""

    name: str
    source_state: SourceState
    model: str | None
    """Active model as ``name@version``; None while no model is loaded."""
    error: str | None = None
    """Why the source or model is not working, for a human."""


class Status(_Message, frozen=True, kw_only=True):
    """Retained availability of a device; the broker publishes ``offline`` as last will."""

    device_id: str
    state: DeviceState
    ts: float
    agent_version: str
    started_at: float
    """When the agent process started (epoch s); uptime = ts - started_at."""
    streams: list[StreamStatus] = msgspec.field(default_factory=list)
    facts: dict[str, str | int | float | bool | None] = msgspec.field(default_factory=dict)
    """Hardware/runtime facts: arch, os, board, cpu_count, mem_total_bytes, python,
    runtimes (comma-separated detector runtimes installed), accelerator."""


# --- telemetry ------------------------------------------------------------------------


class StreamTelemetry(_Part, frozen=True, kw_only=True):
    name: str
    source_state: SourceState
    fps: float
    """Frames inferred per second over the last interval."""
    frames_captured: int
    frames_processed: int
    frames_dropped: int
    """Frames the source produced that were replaced by a newer one before inference."""
    infer_ms_p50: float | None
    infer_ms_p95: float | None
    latency_ms_p50: float | None
    """Capture to publish, end to end."""
    latency_ms_p95: float | None
    errors: int = 0
    reconnects: int = 0
    score_psi: float | None = None
    """Drift KPI: population stability index of the recent detection scores against the
    active model's baseline (< 0.1 no change, > 0.25 a significant shift); None until both
    have enough detections."""


class Telemetry(_Message, frozen=True, kw_only=True):
    device_id: str
    ts: float
    interval_s: float
    cpu_percent: float
    mem_percent: float
    mem_used_bytes: int
    temp_c: float | None
    disk_percent: float
    disk_free_bytes: int
    spool_depth: int
    """Detection messages waiting on disk for the broker."""
    spool_dropped: int
    """Detection messages dropped because the spool was full (since start)."""
    streams: list[StreamTelemetry] = msgspec.field(default_factory=list)


# --- detections -----------------------------------------------------------------------


class Detection(_Part, frozen=True, kw_only=True):
    label: str
    score: float
    box: tuple[float, float, float, float]
    """[xmin, ymin, xmax, ymax], normalized to the original frame."""


class Detections(_Message, frozen=True, kw_only=True):
    """The result of one inferred frame. ``seq`` grows by one per message, per device."""

    device_id: str
    stream: str
    seq: int
    frame_ts: float
    frame_index: int
    model: str
    """``name@version`` of the model that produced the result."""
    infer_ms: float
    width: int
    height: int
    detections: list[Detection]


# --- desired / reported (device shadow) ------------------------------------------------


GateAction = Literal["rollback", "commit"]
"""What the health gate does when its time is up and the evidence still decides nothing."""


class Gate(_Part, frozen=True, kw_only=True):
    """Per-rollout overrides of a device's health gate (its ``[ota]`` defaults otherwise).

    The gate compares the candidate with the model serving now on the same live frames
    (shadow evaluation before the swap, the old model in the shadow during probation); see
    docs/ota.md, "The health gate". A field left out keeps the device's default.
    """

    compare: bool = True
    """False: replace, do not compare (a model whose labels or purpose differ on purpose);
    golden samples, errors and the frame rate are still checked."""
    min_agreement: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    """Least box agreement (F1) with the current model; fails when the whole confidence
    interval lies below it."""
    max_latency_ratio: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] | None = None
    """Largest paired median inference-time ratio candidate / current."""
    max_errors: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    """Inference errors (exceptions, NaN/inf outputs) the candidate may raise."""
    undecided: GateAction | None = None
    """When the evidence is still inconclusive at the end of the shadow phase."""


class ModelRef(_Part, frozen=True, kw_only=True):
    """Where to get a model bundle and how to check it."""

    name: str
    version: str
    url: str
    sha256: str
    size: int
    signature: str | None = None
    """Base64 ed25519 signature over the bundle manifest."""
    gate: Gate | None = None
    """Health-gate overrides for this deployment (None: the device's defaults)."""


class Desired(_Message, frozen=True, kw_only=True):
    """Retained desired state written by the controller."""

    rev: int
    models: dict[str, ModelRef]
    """Stream name to model."""
    rollout_id: str | None = None


DeploymentPhase = Literal[
    "idle",
    "downloading",
    "verifying",
    "staging",
    "shadow",
    "switching",
    "probation",
    "committed",
    "rolled_back",
    "failed",
]


DEPLOYING_PHASES: frozenset[DeploymentPhase] = frozenset(
    {"downloading", "verifying", "staging", "shadow", "switching", "probation"}
)
"""Phases of a deployment in progress (docs/ota.md)."""
OUTCOME_PHASES: frozenset[DeploymentPhase] = frozenset({"committed", "failed", "rolled_back"})
"""Phases that end a deployment."""
FAILED_PHASES: frozenset[DeploymentPhase] = frozenset({"failed", "rolled_back"})
"""Outcomes where the new model did not stay: it never went live, or was rolled back."""

EventLevel = Literal["info", "warning", "error"]
"""How much an event matters: ``info`` (progress), ``warning`` (degraded, recovered by
itself or rolled back), ``error`` (needs an operator)."""
EVENT_LEVELS: tuple[EventLevel, ...] = ("info", "warning", "error")
"""The levels, least severe first."""

GateVerdict = Literal["pass", "fail", "undecided"]


class GateEvidence(_Part, frozen=True, kw_only=True):
    """What the health gate measured: the candidate against the current model on the same
    frames. ``summary`` says it in words; the numbers are for tools."""

    stage: Literal["shadow", "probation"]
    """``shadow``: before the swap; ``probation``: after it (old model in the shadow)."""
    pairs: int
    """Frames both models inferred, back to back."""
    informative_pairs: int
    """Paired frames where at least one model detected something (the only ones that can
    prove agreement; an empty scene agrees trivially)."""
    agreement: float | None
    """Box agreement of the candidate with the current model (F1 of IoU-matched boxes)."""
    agreement_low: float | None
    agreement_high: float | None
    precision: float | None
    """Share of the candidate's boxes the current model also found."""
    recall: float | None
    """Share of the current model's boxes the candidate also found."""
    latency_ratio: float | None
    """Paired median inference time, candidate / current."""
    latency_ratio_low: float | None
    latency_ratio_high: float | None
    score_shift: float | None
    """Median score difference (candidate - current) of matched boxes (informational)."""
    errors: int
    """Candidate inference errors (exceptions, NaN or infinite outputs)."""
    confidence: float
    """Confidence level of the intervals (e.g. 0.95)."""
    verdict: GateVerdict
    reason: str | None = None
    """Machine-readable reason of a ``fail`` (or of an ``undecided`` that was decided by the
    configured default)."""
    summary: str
    """The evidence in words, e.g. "agrees with the current model on 97.8% of boxes (95% CI
    96.1-98.9%) over 412 paired frames; median latency 1.05x"."""


class StreamReport(_Part, frozen=True, kw_only=True):
    active: str | None
    """``name@version``."""
    previous: str | None = None
    installed: list[str] = msgspec.field(default_factory=list)
    phase: DeploymentPhase = "idle"
    target: str | None = None
    reason: str | None = None
    gate: GateEvidence | None = None
    """The health gate's evidence for ``target`` (shadow, then probation); kept with the
    outcome until the next deployment."""


class Reported(_Message, frozen=True, kw_only=True):
    """Retained reported state of the device."""

    device_id: str
    ts: float
    desired_rev: int | None
    streams: dict[str, StreamReport]


# --- events ---------------------------------------------------------------------------


class Event(_Message, frozen=True, kw_only=True):
    """Something happened on the device: deployment progress, failures, source trouble.

    ``code`` is machine readable (e.g. ``source.unreachable``, ``deploy.sha256_mismatch``).
    """

    device_id: str
    ts: float
    code: str
    level: EventLevel
    message: str
    stream: str | None = None
    phase: DeploymentPhase | None = None
    details: dict[str, str | int | float | bool | None] = msgspec.field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[_Message]] = {
    "status": Status,
    "telemetry": Telemetry,
    "detections": Detections,
    "desired": Desired,
    "reported": Reported,
    "events": Event,
}
"""Topic kind (last level, ``detections`` without its stream) to message type."""

M = TypeVar("M", bound=_Message)

_ENCODER = msgspec.json.Encoder()


@functools.cache
def _decoder(message_type: type[Any]) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(message_type)


def encode(message: msgspec.Struct) -> bytes:
    """Encode a message to compact JSON bytes."""
    return _ENCODER.encode(message)


def decode(payload: bytes | str, message_type: type[M]) -> M:
    """Decode JSON strictly into ``message_type`` or raise ProtocolError."""
    try:
        result: M = _decoder(message_type).decode(payload)
    except msgspec.ValidationError as err:
        raise ProtocolError(f"invalid {message_type.__name__} message: {err}") from err
    except msgspec.DecodeError as err:
        raise ProtocolError(f"{message_type.__name__} payload is not valid JSON: {err}") from err
    return result
