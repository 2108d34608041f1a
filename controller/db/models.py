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
    last_seen: Mapped[float] = mapped_column(Double())
    """When the controller last received any message of the device."""
    online: Mapped[bool] = mapped_column(Boolean(), default=False)
    state: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    """Last ``status.state``: online, offline (also the last will) or stopping."""
    status_ts: Mapped[float | None] = mapped_column(Double())
    agent_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    started_at: Mapped[float | None] = mapped_column(Double())
    facts: Mapped[dict[str, Any]] = mapped_column(JSON(), default=dict)
    """Hardware/runtime facts (free-form JSON object): last telemetry snapshot, runtimes, ..."""
    desired_rev: Mapped[int | None] = mapped_column(BigInteger())
    """``desired_rev`` of the last reported state."""
    reported_at: Mapped[float | None] = mapped_column(Double())
    last_telemetry_at: Mapped[float | None] = mapped_column(Double())

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
    updated_at: Mapped[float] = mapped_column(Double())

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


devices = cast(Table, Device.__table__)
device_tags = cast(Table, DeviceTag.__table__)
device_streams = cast(Table, DeviceStream.__table__)
telemetry = cast(Table, TelemetrySample.__table__)
events = cast(Table, DeviceEvent.__table__)
api_tokens = cast(Table, ApiToken.__table__)
models = cast(Table, Model.__table__)
