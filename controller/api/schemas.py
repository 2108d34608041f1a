"""Request and response bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]
RoleName = Literal["viewer", "operator", "admin"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


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
    updated_at: float


class DeviceOut(_Out):
    id: str
    online: bool
    state: str | None = Field(description="last status: online, offline (last will) or stopping")
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


class TagsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    add: list[Tag] = Field(default_factory=list)
    remove: list[Tag] = Field(default_factory=list)


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
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
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


class ModelList(BaseModel):
    models: list[ModelOut]
