"""Initial schema: devices, tags, streams, telemetry, events, API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 22:31:15.064850
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("last_used_at", sa.Double(), nullable=True),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("status_ts", sa.Double(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("desired_rev", sa.BigInteger(), nullable=True),
        sa.Column("reported_at", sa.Double(), nullable=True),
        sa.Column("last_telemetry_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index("ix_devices_online", "devices", ["online"], unique=False)

    op.create_table(
        "device_streams",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("source_state", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("active_model", sa.String(length=200), nullable=True),
        sa.Column("previous_model", sa.String(length=200), nullable=True),
        sa.Column("installed", sa.JSON(), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("target", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_streams_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "name", name=op.f("pk_device_streams")),
    )
    op.create_index(
        "ix_device_streams_active_model", "device_streams", ["active_model"], unique=False
    )

    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_tags_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "tag", name=op.f("pk_device_tags")),
    )
    op.create_index("ix_device_tags_tag", "device_tags", ["tag"], unique=False)

    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("code", sa.String(length=100), nullable=False),
        sa.Column("level", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=True),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_events_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_code", "events", ["code"], unique=False)
    op.create_index("ix_events_device_ts", "events", ["device_id", "ts"], unique=False)
    op.create_index("ix_events_ts", "events", ["ts"], unique=False)

    op.create_table(
        "telemetry",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("resolution_s", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("interval_s", sa.Double(), nullable=False),
        sa.Column("cpu_percent", sa.Double(), nullable=False),
        sa.Column("mem_percent", sa.Double(), nullable=False),
        sa.Column("mem_used_bytes", sa.BigInteger(), nullable=False),
        sa.Column("temp_c", sa.Double(), nullable=True),
        sa.Column("disk_percent", sa.Double(), nullable=False),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("spool_depth", sa.BigInteger(), nullable=False),
        sa.Column("spool_dropped", sa.BigInteger(), nullable=False),
        sa.Column("streams", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_telemetry_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry")),
    )
    op.create_index("ix_telemetry_device_ts", "telemetry", ["device_id", "ts"], unique=False)
    op.create_index("ix_telemetry_resolution_ts", "telemetry", ["resolution_s", "ts"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_telemetry_resolution_ts", table_name="telemetry")
    op.drop_index("ix_telemetry_device_ts", table_name="telemetry")

    op.drop_table("telemetry")
    op.drop_index("ix_events_ts", table_name="events")
    op.drop_index("ix_events_device_ts", table_name="events")
    op.drop_index("ix_events_code", table_name="events")

    op.drop_table("events")
    op.drop_index("ix_device_tags_tag", table_name="device_tags")

    op.drop_table("device_tags")
    op.drop_index("ix_device_streams_active_model", table_name="device_streams")

    op.drop_table("device_streams")
    op.drop_index("ix_devices_online", table_name="devices")

    op.drop_table("devices")
    op.drop_table("api_tokens")
