"""SQLAlchemy 2.x models of the controller's database.

Times are UNIX epoch seconds (double precision), like the protocol. Every schema change
goes through an Alembic migration in ``controller/migrations/versions`` and
``tests/controller/test_migrations.py`` checks that the models and the migrations agree.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

ID_LEN = 64
"""Device ids and stream names (protocol: 1-64 characters)."""
MODEL_LEN = 200
"""``name@version`` strings."""
CODE_LEN = 100
SHORT_LEN = 32
VERSION_LEN = 64


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Device(Base):
    """One device, created on its first MQTT message."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Double())
    last_seen: Mapped[float] = mapped_column(Double(), index=True)
    """When the controller last received any message of the device."""
    online: Mapped[bool] = mapped_column(Boolean(), default=False)
    state: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    """Last ``status.state``: online, offline (also the last will) or stopping; ``revoked``
    after ``devices revoke`` (controller.fleet.credentials)."""
    status_ts: Mapped[float | None] = mapped_column(Double())
    agent_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    started_at: Mapped[float | None] = mapped_column(Double())
    facts: Mapped[dict[str, Any]] = mapped_column(JSON(), default=dict)
    """Hardware/runtime facts (free-form JSON object): last telemetry snapshot, runtimes, ..."""
    desired_rev: Mapped[int | None] = mapped_column(BigInteger())
    """``desired_rev`` of the last reported state."""
    reported_at: Mapped[float | None] = mapped_column(Double())
    last_telemetry_at: Mapped[float | None] = mapped_column(Double())
    cpu_percent: Mapped[float | None] = mapped_column(Double())
    """From the latest telemetry message (like ``mem_percent`` and ``temp_c``)."""
    mem_percent: Mapped[float | None] = mapped_column(Double())
    temp_c: Mapped[float | None] = mapped_column(Double())
    status_seq: Mapped[int | None] = mapped_column(BigInteger())
    """``seq`` of the stored status (None: an agent from before it): a status of the same
    process (``started_at``) with a lower one is older and not written."""
    state_seq: Mapped[int] = mapped_column(BigInteger(), default=0, server_default="0")
    """Counts the writes of the device's status and reported state (what rollouts are judged
    on): the rollout engine re-derives an execution only when its device's count moved."""

    __table_args__ = (Index("ix_devices_online", "online"),)


class DeviceTag(Base):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)

    __table_args__ = (Index("ix_device_tags_tag", "tag"),)


class DeviceStream(Base):
    """One camera stream of a device with its active and previous model."""

    __tablename__ = "device_streams"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    source_state: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    error: Mapped[str | None] = mapped_column(Text())
    active_model: Mapped[str | None] = mapped_column(String(MODEL_LEN))
    previous_model: Mapped[str | None] = mapped_column(String(MODEL_LEN))
    installed: Mapped[list[str]] = mapped_column(JSON(), default=list)
    phase: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    target: Mapped[str | None] = mapped_column(String(MODEL_LEN))
    reason: Mapped[str | None] = mapped_column(Text())
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """The health gate's evidence for ``target`` (``protocol.GateEvidence`` as JSON)."""
    updated_at: Mapped[float] = mapped_column(Double())
    fps: Mapped[float | None] = mapped_column(Double())
    """From the latest telemetry message (like ``infer_ms_p95`` and ``latency_ms_p95``)."""
    infer_ms_p95: Mapped[float | None] = mapped_column(Double())
    latency_ms_p95: Mapped[float | None] = mapped_column(Double())

    __table_args__ = (Index("ix_device_streams_active_model", "active_model"),)


class TelemetrySample(Base):
    """A telemetry message (``resolution_s`` 0) or the average of ``samples`` of them."""

    __tablename__ = "telemetry"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE")
    )
    ts: Mapped[float] = mapped_column(Double())
    resolution_s: Mapped[int] = mapped_column(Integer(), default=0)
    samples: Mapped[int] = mapped_column(Integer(), default=1)
    interval_s: Mapped[float] = mapped_column(Double())
    cpu_percent: Mapped[float] = mapped_column(Double())
    mem_percent: Mapped[float] = mapped_column(Double())
    mem_used_bytes: Mapped[int] = mapped_column(BigInteger())
    temp_c: Mapped[float | None] = mapped_column(Double())
    disk_percent: Mapped[float] = mapped_column(Double())
    disk_free_bytes: Mapped[int] = mapped_column(BigInteger())
    spool_depth: Mapped[int] = mapped_column(BigInteger())
    spool_dropped: Mapped[int] = mapped_column(BigInteger())
    streams: Mapped[list[dict[str, Any]]] = mapped_column(JSON(), default=list)

    __table_args__ = (
        Index("ix_telemetry_device_ts", "device_id", "ts"),
        Index("ix_telemetry_resolution_ts", "resolution_s", "ts"),
    )


class DeviceEvent(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE")
    )
    ts: Mapped[float] = mapped_column(Double())
    received_at: Mapped[float] = mapped_column(Double())
    code: Mapped[str] = mapped_column(String(CODE_LEN))
    level: Mapped[str] = mapped_column(String(SHORT_LEN))
    message: Mapped[str] = mapped_column(Text())
    stream: Mapped[str | None] = mapped_column(String(ID_LEN))
    phase: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    details: Mapped[dict[str, Any]] = mapped_column(JSON(), default=dict)

    __table_args__ = (
        Index("ix_events_device_ts", "device_id", "ts"),
        Index("ix_events_ts", "ts"),
        Index("ix_events_code", "code"),
    )


class ApiToken(Base):
    """A bearer token of the HTTP API; only the sha256 of the token is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(CODE_LEN))
    role: Mapped[str] = mapped_column(String(SHORT_LEN))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """The first characters of the token, to recognise it in listings."""
    created_at: Mapped[float] = mapped_column(Double())
    last_used_at: Mapped[float | None] = mapped_column(Double())
    revoked_at: Mapped[float | None] = mapped_column(Double())


class Model(Base):
    """An uploaded model bundle; the file itself lives in the blob store by ``sha256``."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(ID_LEN))
    version: Mapped[str] = mapped_column(String(VERSION_LEN))
    sha256: Mapped[str] = mapped_column(String(64))
    """Of the whole ``.efb`` file (also its blob store key)."""
    size: Mapped[int] = mapped_column(BigInteger())
    runtime: Mapped[str] = mapped_column(String(SHORT_LEN))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON())
    signature: Mapped[str | None] = mapped_column(Text())
    """Base64 ``manifest.sig``; None for an unsigned bundle."""
    download_key: Mapped[str] = mapped_column(String(64))
    """Random secret in the bundle's download URL, so devices fetch it without an API token."""
    key_id: Mapped[str | None] = mapped_column(String(16))
    """Id of the trusted key that verified the signature at upload (None: not checked)."""
    created_at: Mapped[float] = mapped_column(Double())

    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)


class Rollout(Base):
    """A staged deployment of one model version to one stream on a frozen device selection."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(BigInteger(), ForeignKey("models.id"))
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    """``name@version`` of the model being deployed."""
    stream: Mapped[str] = mapped_column(String(ID_LEN))
    """A stream name, or ``*`` (every stream each device reported at creation)."""
    selector: Mapped[list[str]] = mapped_column(JSON(), default=list)
    """The ``--select`` values as given (``all``, ``tag=T``, device ids); resolved at creation."""
    stage_spec: Mapped[str] = mapped_column(String(CODE_LEN))
    """The ``--stages`` value as given, e.g. ``1,10%,50%,100%``."""
    stages: Mapped[list[int]] = mapped_column(JSON(), default=list)
    """Cumulative device counts per stage, resolved against the selection at creation."""
    device_count: Mapped[int] = mapped_column(Integer())
    bake_s: Mapped[float] = mapped_column(Double())
    max_failures: Mapped[float] = mapped_column(Double())
    """Largest tolerated failure share, 0..1."""
    min_executed: Mapped[int] = mapped_column(Integer())
    timeout_s: Mapped[float] = mapped_column(Double())
    state: Mapped[str] = mapped_column(String(SHORT_LEN))
    """active, paused, completed, aborted or rolled_back."""
    current_stage: Mapped[int] = mapped_column(Integer(), default=0)
    stage_started_at: Mapped[float | None] = mapped_column(Double())
    """When the current stage's devices were assigned; None: not assigned yet."""
    stage_done_at: Mapped[float | None] = mapped_column(Double())
    """When every device of the current stage finished (the bake starts then)."""
    reason: Mapped[str | None] = mapped_column(String(CODE_LEN))
    """Why it ended early: stage_failed, failure_threshold, health_regression, operator."""
    detail: Mapped[str | None] = mapped_column(Text())
    created_by: Mapped[str | None] = mapped_column(String(CODE_LEN))
    created_at: Mapped[float] = mapped_column(Double())
    updated_at: Mapped[float] = mapped_column(Double())
    finished_at: Mapped[float | None] = mapped_column(Double())
    rolled_back_at: Mapped[float | None] = mapped_column(Double())
    """When the pre-rollout desired states were written back (aborted / rolled_back)."""
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """Health-gate overrides (``protocol.Gate`` fields that differ from the device's
    defaults); written into every ``ModelRef`` of the rollout. None: the defaults."""

    __table_args__ = (Index("ix_rollouts_state", "state"),)


class RolloutDevice(Base):
    """One (device, stream) of a rollout: its stage, pre-rollout model and execution status."""

    __tablename__ = "rollout_devices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(
        BigInteger(), ForeignKey("rollouts.id", ondelete="CASCADE")
    )
    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE")
    )
    stream: Mapped[str] = mapped_column(String(ID_LEN))
    stage: Mapped[int] = mapped_column(Integer())
    status: Mapped[str] = mapped_column(String(SHORT_LEN))
    """pending (not assigned yet), queued, in_progress, succeeded, failed, timed_out, rolled_back."""
    previous_model: Mapped[str | None] = mapped_column(String(MODEL_LEN))
    """``name@version`` of the stream's desired model before the rollout; None = baseline."""
    previous_ref: Mapped[dict[str, Any] | None] = mapped_column(JSON())
    """The stream's ``ModelRef`` in the desired state before the rollout (None = baseline)."""
    rev: Mapped[int | None] = mapped_column(BigInteger())
    """The desired ``rev`` that carried the rollout's model to the device."""
    rollback_rev: Mapped[int | None] = mapped_column(BigInteger())
    """The desired ``rev`` that gave the device its pre-rollout model back."""
    phase: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    """The device's last reported deployment phase for the stream."""
    reason: Mapped[str | None] = mapped_column(Text())
    stale_outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON())
    """The stream's reported failure of this same model from before the assignment (phase,
    target, reason), if any: seen again, it is no outcome of this rollout yet."""
    evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """The last health-gate evidence (``protocol.GateEvidence``) the device reported for
    the rollout's model on this stream."""
    assigned_at: Mapped[float | None] = mapped_column(Double())
    finished_at: Mapped[float | None] = mapped_column(Double())
    updated_at: Mapped[float] = mapped_column(Double())

    __table_args__ = (
        UniqueConstraint(
            "rollout_id", "device_id", "stream", name="uq_rollout_devices_rollout_device_stream"
        ),
        Index("ix_rollout_devices_device_stream", "device_id", "stream"),
        Index("ix_rollout_devices_rollout_stage", "rollout_id", "stage"),
    )


class DeviceDesired(Base):
    """The desired state the controller wants a device to have, and whether it was published."""

    __tablename__ = "device_desired"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    rev: Mapped[int] = mapped_column(BigInteger())
    models: Mapped[dict[str, Any]] = mapped_column(JSON(), default=dict)
    """Stream name to ``protocol.ModelRef`` (as JSON); a stream absent runs its baseline."""
    rollout_id: Mapped[int | None] = mapped_column(
        BigInteger(), ForeignKey("rollouts.id", ondelete="SET NULL")
    )
    published: Mapped[bool] = mapped_column(Boolean(), default=False)
    """True once the broker acknowledged the retained message of this ``rev``."""
    updated_at: Mapped[float] = mapped_column(Double())
    published_at: Mapped[float | None] = mapped_column(Double())

    __table_args__ = (Index("ix_device_desired_published", "published"),)


class DeviceCredential(Base):
    """A device's login on the embedded MQTT broker (``edgefleet devices enroll``): the
    username is the device id, the password is kept only as a Mosquitto ``$7$`` hash."""

    __tablename__ = "device_credentials"

    device_id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(CODE_LEN * 2))
    created_at: Mapped[float] = mapped_column(Double())


class DeviceSnapshot(Base):
    """The latest camera snapshot of a stream (agent ``[snapshots]``): a JPEG with the
    detections drawn, and the detections themselves."""

    __tablename__ = "device_snapshots"

    device_id: Mapped[str] = mapped_column(
        String(ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    stream: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    ts: Mapped[float] = mapped_column(Double())
    """When the frame was captured (device clock)."""
    received_at: Mapped[float] = mapped_column(Double())
    model: Mapped[str | None] = mapped_column(String(MODEL_LEN))
    width: Mapped[int] = mapped_column(Integer())
    height: Mapped[int] = mapped_column(Integer())
    detections: Mapped[list[dict[str, Any]]] = mapped_column(JSON(), default=list)
    jpeg: Mapped[bytes] = mapped_column(LargeBinary())


devices = cast(Table, Device.__table__)
device_tags = cast(Table, DeviceTag.__table__)
device_streams = cast(Table, DeviceStream.__table__)
telemetry = cast(Table, TelemetrySample.__table__)
events = cast(Table, DeviceEvent.__table__)
api_tokens = cast(Table, ApiToken.__table__)
models = cast(Table, Model.__table__)
rollouts = cast(Table, Rollout.__table__)
rollout_devices = cast(Table, RolloutDevice.__table__)
device_desired = cast(Table, DeviceDesired.__table__)
device_credentials = cast(Table, DeviceCredential.__table__)
device_snapshots = cast(Table, DeviceSnapshot.__table__)


class ConsoleSession(Base):
    """A login of the web console (``controller.console``): the random session id is kept
    only as its sha256; ``csrf`` is the per-session secret every console form carries.
    Sessions end ``expires_at`` (12 h after their last use) or when their token is revoked."""

    __tablename__ = "console_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[int] = mapped_column(
        Integer(), ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double())
    last_used_at: Mapped[float] = mapped_column(Double())
    expires_at: Mapped[float] = mapped_column(Double(), index=True)


console_sessions = cast(Table, ConsoleSession.__table__)


class BundleChunk(Base):
    """A piece of a model bundle kept in the database (``models.storage = "database"``):
    bundle ``sha256``'s bytes from ``pos`` on. Written in the upload's transaction with the
    model row; a bundle shared by several models is kept once."""

    __tablename__ = "bundle_chunks"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    pos: Mapped[int] = mapped_column(BigInteger(), primary_key=True)
    """Offset of the chunk's first byte in the bundle."""
    data: Mapped[bytes] = mapped_column(LargeBinary())


bundle_chunks = cast(Table, BundleChunk.__table__)
