"""Request and response bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import MaxLen, MinLen
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from controller.api.params import (
    MAX_SELECT,
    MAX_STAGES,
    Duration,
    MinExecuted,
    ModelRef,
    Name,
    Note,
    PositiveDuration,
    SelectItem,
    Share,
    StageItem,
    StageSpec,
    StreamSpec,
    TagList,
)
from controller.errors import RolloutError
from controller.rollouts import gate as gates

RoleName = Literal["viewer", "operator", "admin"]

_INPUT = ConfigDict(extra="forbid", allow_inf_nan=False)
"""Request bodies: unknown fields and non-finite numbers (NaN, Infinity) are refused."""


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class GateEvidenceOut(BaseModel):
    """The device's health gate: the candidate against the current model on the same frames
    (``protocol.GateEvidence``)."""

    stage: Literal["shadow", "probation"]
    pairs: int = Field(description="frames both models inferred")
    informative_pairs: int = Field(description="paired frames where a model detected something")
    agreement: float | None = Field(description="box agreement (F1) with the current model")
    agreement_low: float | None
    agreement_high: float | None
    precision: float | None
    recall: float | None
    latency_ratio: float | None = Field(description="paired median inference time ratio")
    latency_ratio_low: float | None
    latency_ratio_high: float | None
    score_shift: float | None
    errors: int
    confidence: float = Field(description="confidence level of the intervals, e.g. 0.95")
    verdict: Literal["pass", "fail", "undecided"]
    reason: str | None
    summary: str = Field(description="the evidence in words")


class StreamOut(_Out):
    name: str
    source_state: str | None
    error: str | None
    active_model: str | None = Field(description="name@version of the running model")
    previous_model: str | None
    installed: list[str]
    phase: str | None = Field(description="deployment phase from the reported state")
    target: str | None
    reason: str | None
    gate: GateEvidenceOut | None = Field(
        default=None, description="the health gate's evidence for target, as reported"
    )
    updated_at: float


class DeviceOut(_Out):
    id: str
    online: bool
    state: str | None = Field(
        description=(
            "last status: online, offline (last will) or stopping; revoked after `devices revoke`"
        )
    )
    first_seen: float = Field(description="epoch seconds (controller clock)")
    last_seen: float
    status_ts: float | None
    agent_version: str | None
    started_at: float | None
    desired_rev: int | None
    reported_at: float | None
    last_telemetry_at: float | None
    facts: dict[str, Any]
    tags: list[str]
    streams: list[StreamOut]


class DeviceList(BaseModel):
    devices: list[DeviceOut]


class FleetStreamOut(_Out):
    name: str
    active_model: str | None = Field(description="name@version of the running model")
    fps: float | None = Field(description="frames inferred per second (latest telemetry)")
    infer_ms_p95: float | None
    latency_ms_p95: float | None = Field(description="capture to publish, 95th percentile")
    phase: str | None = Field(description="deployment phase from the reported state")


class FleetRowOut(_Out):
    id: str
    online: bool
    state: str | None
    agent_version: str | None
    last_seen: float = Field(description="epoch seconds (controller clock)")
    cpu_percent: float | None = Field(description="from the latest telemetry, like mem and temp")
    mem_percent: float | None
    temp_c: float | None
    tags: list[str]
    streams: list[FleetStreamOut]


class FleetCounts(BaseModel):
    total: int = Field(description="every device in the fleet, whatever the filters")
    online: int
    offline: int = Field(description="neither online nor revoked")
    revoked: int


class FleetPageOut(_Out):
    """One page of the fleet: ``total`` devices match the filters, ``counts`` are the
    whole fleet's."""

    rows: list[FleetRowOut]
    total: int
    counts: FleetCounts
    limit: int
    offset: int
    sort: str
    order: str


class TagsIn(BaseModel):
    """Tags to add and remove (at most 64 each; a device keeps at most 64 tags)."""

    model_config = _INPUT

    add: TagList = Field(default_factory=list)
    remove: TagList = Field(default_factory=list)


class TagsOut(BaseModel):
    device_id: str
    tags: list[str]


class TelemetryOut(_Out):
    ts: float
    resolution_s: int = Field(description="0 for a raw sample, else the averaging bucket size")
    samples: int
    interval_s: float
    cpu_percent: float
    mem_percent: float
    mem_used_bytes: int
    temp_c: float | None
    disk_percent: float
    disk_free_bytes: int
    spool_depth: int
    spool_dropped: int
    streams: list[dict[str, Any]]


class TelemetryList(BaseModel):
    device_id: str
    samples: list[TelemetryOut]


class EventOut(_Out):
    id: int
    device_id: str
    ts: float
    received_at: float
    code: str
    level: str
    message: str
    stream: str | None
    phase: str | None
    details: dict[str, Any]


class EventList(BaseModel):
    events: list[EventOut]


class TokenOut(_Out):
    id: int
    name: str
    role: RoleName
    prefix: str = Field(description="the first characters of the token")
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


class TokenList(BaseModel):
    tokens: list[TokenOut]


class TokenCreateIn(BaseModel):
    model_config = _INPUT

    name: Name = Field(description="1-100 characters, no control characters")
    role: RoleName


class TokenCreated(TokenOut):
    token: str = Field(description="the bearer token; shown only once")


class WhoAmI(BaseModel):
    id: int
    name: str
    role: RoleName


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    mqtt: Literal["connected", "disconnected", "not running"]


class ModelOut(BaseModel):
    name: str
    version: str
    ref: str = Field(description="name@version")
    sha256: str = Field(description="of the whole .efb bundle file")
    size: int
    runtime: str
    signature: str | None = Field(description="base64 manifest.sig; null when unsigned")
    key_id: str | None = Field(description="trusted key that verified the signature at upload")
    created_at: float
    download_url: str = Field(
        description="path of the bundle for devices (carries its own download key; no token needed)"
    )
    manifest: dict[str, Any]
    lineage: dict[str, Any] | None = Field(
        default=None,
        description="the manifest's lineage (source_commit, training_data, metrics, labels); "
        "null when it has none",
    )


class ModelList(BaseModel):
    models: list[ModelOut]


# --- rollouts -------------------------------------------------------------------------------

RolloutStateName = Literal["active", "paused", "completed", "aborted", "rolled_back"]


class GateSettings(BaseModel):
    """Health-gate overrides for a rollout (``protocol.Gate``); a field left out or null keeps
    the device's ``[ota]`` default."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    compare: bool = Field(
        default=True,
        description="false: replace, do not compare (labels differ on purpose); golden "
        "samples, errors and the frame rate still apply",
    )
    # The ranges are checked by _in_range (with messages that name the field and the range)
    # and published in the schema with json_schema_extra.
    min_agreement: float | None = Field(
        default=None,
        description="least box agreement with the current model, 0..1",
        json_schema_extra={"minimum": 0, "maximum": 1},
    )
    max_latency_ratio: float | None = Field(
        default=None,
        description=f"largest median inference-time ratio candidate/current, "
        f"above 0 and at most {gates.MAX_LATENCY_RATIO:g}",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": gates.MAX_LATENCY_RATIO},
    )
    max_errors: int | None = Field(
        default=None,
        description=f"candidate inference errors allowed, 0..{gates.MAX_ERRORS}",
        json_schema_extra={"minimum": 0, "maximum": gates.MAX_ERRORS},
    )
    undecided: Literal["rollback", "commit"] | None = Field(
        default=None, description="what an inconclusive shadow phase ends in"
    )

    @field_validator("max_errors", mode="before")
    @classmethod
    def _whole(cls, value: object) -> object:
        """JSON 3.0 is the integer 3 (as JSON Schema says); strict mode would refuse it."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("min_agreement", "max_latency_ratio", "max_errors")
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        try:
            gates.check_value(str(info.field_name), value)
        except RolloutError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GateSettings:
        try:
            gates.normalize(self.model_dump())
        except RolloutError as err:
            raise ValueError(str(err)) from None
        return self


class RolloutIn(BaseModel):
    model_config = _INPUT

    model: ModelRef = Field(
        description="name@version from the registry", examples=["blazeface@1.2.0"]
    )
    stream: StreamSpec = Field(
        default="*", description="a stream name, or * for every stream each device reports"
    )
    select: Annotated[list[SelectItem], MinLen(1), MaxLen(MAX_SELECT)] = Field(
        description="'all', 'tag=KEY:VALUE' or device ids; a device matching any is selected",
        examples=[["tag=site:berlin"]],
    )
    stages: Annotated[list[StageItem], MinLen(1), MaxLen(MAX_STAGES)] | StageSpec = Field(
        default="1,10%,50%,100%",
        description="cumulative stages: a bare number is a device count, N% a share of the "
        f"selection (at most {MAX_STAGES})",
    )
    bake_s: Duration = Field(
        default=600.0, description="watch each finished stage this long (at most a year)"
    )
    max_failures: Share = Field(default=0.05, description="largest tolerated failure share (0..1)")
    min_executed: MinExecuted = Field(
        default=5, description="finished executions before the overall share counts"
    )
    timeout_s: PositiveDuration = Field(
        default=900.0,
        description="a device not done this long after its assignment fails (at most a year)",
    )
    gate: GateSettings | None = Field(
        default=None, description="health-gate overrides; null: the devices' defaults"
    )


class RolloutActionIn(BaseModel):
    model_config = _INPUT

    reason: Note | None = Field(default=None, description="a note for the record")


class StageOut(BaseModel):
    index: int = Field(description="0-based")
    devices: int = Field(description="cumulative device count at the end of this stage")
    size: int = Field(description="(device, stream) executions in this stage")
    state: Literal["pending", "running", "baking", "done", "stopped"]
    counts: dict[str, int] = Field(description="executions by status")
    started_at: float | None
    done_at: float | None
    bake_left_s: float | None


class RolloutDeviceOut(_Out):
    device_id: str
    stream: str
    stage: int
    status: Literal[
        "pending", "queued", "in_progress", "succeeded", "failed", "timed_out", "rolled_back"
    ]
    phase: str | None = Field(description="the device's last reported deployment phase")
    reason: str | None
    previous_model: str | None = Field(
        description="desired model before the rollout; null = baseline"
    )
    rev: int | None = Field(description="desired rev that carried the rollout's model")
    rollback_rev: int | None = Field(description="desired rev that gave the previous model back")
    assigned_at: float | None
    finished_at: float | None
    evidence: GateEvidenceOut | None = Field(
        default=None,
        description="the health gate's evidence the device reported for the rollout's model",
    )


class RolloutOut(BaseModel):
    id: int
    model: str = Field(description="name@version")
    stream: str
    selector: list[str]
    stage_spec: str
    stages: list[int] = Field(description="cumulative device counts per stage")
    device_count: int
    bake_s: float
    max_failures: float
    min_executed: int
    timeout_s: float
    gate: GateSettings | None = Field(
        default=None, description="health-gate overrides; null: the devices' defaults"
    )
    state: RolloutStateName
    current_stage: int = Field(description="0-based index of the stage being executed")
    reason: str | None = Field(
        description="why it ended early: stage_failed, failure_threshold, health_regression, operator"
    )
    detail: str | None
    created_by: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    rolled_back_at: float | None = Field(
        description="when the pre-rollout desired states were written (aborted, rolled_back)"
    )
    counts: dict[str, int] = Field(description="executions by status")
    executions: int
    finished: int
    failures: int


class RolloutDetailOut(RolloutOut):
    stage_progress: list[StageOut]
    devices: list[RolloutDeviceOut]


class RolloutList(BaseModel):
    rollouts: list[RolloutOut]
