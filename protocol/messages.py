"""Message types of the edgefleet protocol (JSON over MQTT v5).

Every message is a frozen msgspec Struct that rejects unknown fields and carries a
``schema`` version. Decoding is strict: a missing field, an unknown field or a wrong
type raises ProtocolError with the JSON path of the culprit.

Times are UNIX epoch seconds (float). Boxes are ``[xmin, ymin, xmax, ymax]`` normalized
to the original frame (0..1). Every string, number, list and map is bounded
(:mod:`protocol.limits`); the bounds are part of the types, so decoding enforces them and
the exported JSON Schemas carry them.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from protocol.errors import ProtocolError
from protocol.limits import (
    MAX_DETAILS,
    MAX_DETECTIONS,
    MAX_FACTS,
    MAX_INSTALLED,
    MAX_SNAPSHOT_DETECTIONS,
    MAX_STREAMS,
    AgentVersion,
    Code,
    Count,
    Duration,
    ErrorText,
    Fps,
    Id,
    JpegBase64,
    Key,
    Label,
    MessageText,
    Millis,
    ModelName,
    ModelRefText,
    ModelVersion,
    Percent,
    Psi,
    Ratio,
    ReasonText,
    RolloutId,
    Sha256,
    Shift,
    Side,
    Signature,
    SummaryText,
    TempC,
    Timestamp,
    Unit,
    Url,
    Value,
    describe,
)

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

    name: Id
    source_state: SourceState
    model: ModelRefText | None
    """Active model as ``name@version``; None while no model is loaded."""
    error: ErrorText | None = None
    """Why the source or model is not working, for a human."""


STATUS_SEQ_BITS = 24
"""``Status.seq`` = connection number << STATUS_SEQ_BITS | a running count within it."""
_STATUS_SEQ_LAST = (1 << STATUS_SEQ_BITS) - 1
_CONNECTIONS = (1 << (53 - STATUS_SEQ_BITS)) - 1
"""Connection numbers saturate here: every ``seq`` stays within 2^53-1."""


def status_seq(connection: int, count: int) -> int:
    """The ``seq`` of a status built while ``connection`` (1, 2, … of the agent process; 0
    before the first) is or was the last one: after every status of earlier connections
    and its ``count`` (saturating) among them, before the will of ``connection``."""
    return (min(connection, _CONNECTIONS) << STATUS_SEQ_BITS) | min(count, _STATUS_SEQ_LAST - 1)


def will_seq(connection: int) -> int:
    """The ``seq`` of the last will of ``connection``: after every status built while it
    was the last connection, before any of the next one."""
    return (min(connection, _CONNECTIONS) << STATUS_SEQ_BITS) | _STATUS_SEQ_LAST


class Status(_Message, frozen=True, kw_only=True):
    """Retained availability of a device; the broker publishes ``offline`` as last will."""

    device_id: Id
    state: DeviceState
    ts: Timestamp
    agent_version: AgentVersion
    started_at: Timestamp
    """When the agent process started (epoch s); uptime = ts - started_at."""
    seq: Count | None = None
    """The order of the agent process's statuses and last wills (``status_seq``,
    ``will_seq``): of two with the same ``started_at``, the higher ``seq`` is the newer. The
    will is built when the agent connects and carries that time as ``ts``, so ``ts`` cannot
    order it. None: an agent from before ``seq``."""
    streams: Annotated[list[StreamStatus], Meta(max_length=MAX_STREAMS)] = msgspec.field(
        default_factory=list
    )
    facts: Annotated[dict[Key, Value], Meta(max_length=MAX_FACTS)] = msgspec.field(
        default_factory=dict
    )
    """Hardware/runtime facts: arch, os, board, cpu_count, mem_total_bytes, python,
    runtimes (comma-separated detector runtimes installed), accelerator."""


# --- telemetry ------------------------------------------------------------------------


class StreamTelemetry(_Part, frozen=True, kw_only=True):
    name: Id
    source_state: SourceState
    fps: Fps
    """Frames inferred per second over the last interval."""
    frames_captured: Count
    frames_processed: Count
    frames_dropped: Count
    """Frames the source produced that were replaced by a newer one before inference."""
    infer_ms_p50: Millis | None
    infer_ms_p95: Millis | None
    latency_ms_p50: Millis | None
    """Capture to publish, end to end."""
    latency_ms_p95: Millis | None
    errors: Count = 0
    reconnects: Count = 0
    frames_skipped: Count = 0
    """Frames not inferred by choice: the stream's fps cap, and the motion gate (a skipped
    frame publishes no detections, or the last ones again with ``on_skip = "repeat"``)."""
    score_psi: Psi | None = None
    """Drift KPI: population stability index of the recent detection scores against the
    active model's baseline (< 0.1 no change, > 0.25 a significant shift); None until both
    have enough detections."""


class Telemetry(_Message, frozen=True, kw_only=True):
    device_id: Id
    ts: Timestamp
    interval_s: Duration
    cpu_percent: Percent
    mem_percent: Percent
    mem_used_bytes: Count
    temp_c: TempC | None
    disk_percent: Percent
    disk_free_bytes: Count
    spool_depth: Count
    """Detection messages waiting on disk for the broker."""
    spool_dropped: Count
    """Detection messages dropped because the spool was full (since start)."""
    streams: Annotated[list[StreamTelemetry], Meta(max_length=MAX_STREAMS)] = msgspec.field(
        default_factory=list
    )


# --- detections -----------------------------------------------------------------------


class Detection(_Part, frozen=True, kw_only=True):
    label: Label
    score: Unit
    box: tuple[Unit, Unit, Unit, Unit]
    """[xmin, ymin, xmax, ymax], normalized to the original frame."""


class Detections(_Message, frozen=True, kw_only=True):
    """The result of one inferred frame. ``seq`` grows by one per message, per device."""

    device_id: Id
    stream: Id
    seq: Count
    frame_ts: Timestamp
    frame_index: Count
    model: ModelRefText
    """``name@version`` of the model that produced the result."""
    infer_ms: Millis
    width: Side
    height: Side
    detections: Annotated[list[Detection], Meta(max_length=MAX_DETECTIONS)]


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
    min_agreement: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    """Least box agreement (F1) with the current model; fails when the whole confidence
    interval lies below it."""
    max_latency_ratio: Annotated[float, Meta(gt=0.0, le=1000.0)] | None = None
    """Largest paired median inference-time ratio candidate / current."""
    max_errors: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    """Inference errors (exceptions, NaN/inf outputs) the candidate may raise."""
    undecided: GateAction | None = None
    """When the evidence is still inconclusive at the end of the shadow phase."""


class ModelRef(_Part, frozen=True, kw_only=True):
    """Where to get a model bundle and how to check it."""

    name: ModelName
    version: ModelVersion
    url: Url
    sha256: Sha256
    size: Count
    signature: Signature | None = None
    """Base64 ed25519 signature over the bundle manifest."""
    gate: Gate | None = None
    """Health-gate overrides for this deployment (None: the device's defaults)."""


class Desired(_Message, frozen=True, kw_only=True):
    """Retained desired state written by the controller."""

    rev: Count
    models: Annotated[dict[Id, ModelRef], Meta(max_length=MAX_STREAMS)]
    """Stream name to model."""
    rollout_id: RolloutId | None = None


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
    pairs: Count
    """Frames both models inferred, back to back."""
    informative_pairs: Count
    """Paired frames where at least one model detected something (the only ones that can
    prove agreement; an empty scene agrees trivially)."""
    agreement: Unit | None
    """Box agreement of the candidate with the current model (F1 of IoU-matched boxes)."""
    agreement_low: Unit | None
    agreement_high: Unit | None
    precision: Unit | None
    """Share of the candidate's boxes the current model also found."""
    recall: Unit | None
    """Share of the current model's boxes the candidate also found."""
    latency_ratio: Ratio | None
    """Paired median inference time, candidate / current."""
    latency_ratio_low: Ratio | None
    latency_ratio_high: Ratio | None
    score_shift: Shift | None
    """Median score difference (candidate - current) of matched boxes (informational)."""
    errors: Count
    """Candidate inference errors (exceptions, NaN or infinite outputs)."""
    confidence: Unit
    """Confidence level of the intervals (e.g. 0.95)."""
    verdict: GateVerdict
    reason: ReasonText | None = None
    """Machine-readable reason of a ``fail`` (or of an ``undecided`` that was decided by the
    configured default)."""
    summary: SummaryText
    """The evidence in words, e.g. "agrees with the current model on 97.8% of boxes (95% CI
    96.1-98.9%) over 412 paired frames; median latency 1.05x"."""


class StreamReport(_Part, frozen=True, kw_only=True):
    active: ModelRefText | None
    """``name@version``."""
    previous: ModelRefText | None = None
    installed: Annotated[list[ModelRefText], Meta(max_length=MAX_INSTALLED)] = msgspec.field(
        default_factory=list
    )
    phase: DeploymentPhase = "idle"
    target: ModelRefText | None = None
    reason: ReasonText | None = None
    gate: GateEvidence | None = None
    """The health gate's evidence for ``target`` (shadow, then probation); kept with the
    outcome until the next deployment."""


class Reported(_Message, frozen=True, kw_only=True):
    """Retained reported state of the device."""

    device_id: Id
    ts: Timestamp
    desired_rev: Count | None
    streams: Annotated[dict[Id, StreamReport], Meta(max_length=MAX_STREAMS)]


# --- events ---------------------------------------------------------------------------


class Event(_Message, frozen=True, kw_only=True):
    """Something happened on the device: deployment progress, failures, source trouble.

    ``code`` is machine readable (e.g. ``source.unreachable``, ``deploy.sha256_mismatch``).
    """

    device_id: Id
    ts: Timestamp
    code: Code
    level: EventLevel
    message: MessageText
    stream: Id | None = None
    phase: DeploymentPhase | None = None
    details: Annotated[dict[Key, Value], Meta(max_length=MAX_DETAILS)] = msgspec.field(
        default_factory=dict
    )


# --- snapshot -------------------------------------------------------------------------


class Snapshot(_Message, frozen=True, kw_only=True):
    """The latest camera snapshot of a stream (retained): a JPEG of a frame with at least one
    detection, boxes and labels drawn, published at most once per the agent's
    ``[snapshots] interval_s``."""

    device_id: Id
    stream: Id
    ts: Timestamp
    """When the frame was captured (device clock)."""
    model: ModelRefText | None
    """``name@version`` of the model whose detections are drawn."""
    width: Side
    height: Side
    """Of the JPEG (half the frame's when the agent downscaled it to fit ``max_bytes``)."""
    detections: Annotated[list[Detection], Meta(max_length=MAX_SNAPSHOT_DETECTIONS)]
    """The detections drawn (boxes normalized to the image, best first)."""
    jpeg: JpegBase64
    """The JPEG file, standard base64."""


MESSAGE_TYPES: dict[str, type[_Message]] = {
    "status": Status,
    "telemetry": Telemetry,
    "detections": Detections,
    "desired": Desired,
    "reported": Reported,
    "events": Event,
    "snapshot": Snapshot,
}
"""Topic kind (``detections`` and ``snapshot`` without their stream) to message type."""

M = TypeVar("M", bound=_Message)

_ENCODER = msgspec.json.Encoder()


@functools.cache
def decoder(message_type: type[Any]) -> msgspec.json.Decoder[Any]:
    """The strict JSON decoder of ``message_type`` (one per type, reused)."""
    return msgspec.json.Decoder(message_type)


def encode(message: msgspec.Struct) -> bytes:
    """Encode a message to compact JSON bytes."""
    return _ENCODER.encode(message)


def decode(payload: bytes | str, message_type: type[M]) -> M:
    """Decode JSON strictly into ``message_type`` or raise ProtocolError."""
    try:
        result: M = decoder(message_type).decode(payload)
    except msgspec.ValidationError as err:
        raise ProtocolError(
            f"invalid {message_type.__name__} message: {describe(str(err))}"
        ) from err
    except msgspec.DecodeError as err:
        raise ProtocolError(f"{message_type.__name__} payload is not valid JSON: {err}") from err
    return result
