"""Rollouts: staged OTA deployments, their (device, stream) executions, per-device desired state.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 16:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("model_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("stage_spec", sa.String(length=100), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("bake_s", sa.Double(), nullable=False),
        sa.Column("max_failures", sa.Double(), nullable=False),
        sa.Column("min_executed", sa.Integer(), nullable=False),
        sa.Column("timeout_s", sa.Double(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("current_stage", sa.Integer(), nullable=False),
        sa.Column("stage_started_at", sa.Double(), nullable=True),
        sa.Column("stage_done_at", sa.Double(), nullable=True),
        sa.Column("reason", sa.String(length=100), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("rolled_back_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_rollouts_model_id_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"], unique=False)

    op.create_table(
        "device_desired",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("rev", sa.BigInteger(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("rollout_id", sa.BigInteger(), nullable=True),
        sa.Column("published", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("published_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_desired_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_device_desired_rollout_id_rollouts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_desired")),
    )
    op.create_index("ix_device_desired_published", "device_desired", ["published"], unique=False)

    op.create_table(
        "rollout_devices",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("previous_model", sa.String(length=200), nullable=True),
        sa.Column("previous_ref", sa.JSON(), nullable=True),
        sa.Column("rev", sa.BigInteger(), nullable=True),
        sa.Column("rollback_rev", sa.BigInteger(), nullable=True),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("stale_outcome", sa.JSON(), nullable=True),
        sa.Column("assigned_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_rollout_devices_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_devices_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_devices")),
        sa.UniqueConstraint(
            "rollout_id", "device_id", "stream", name="uq_rollout_devices_rollout_device_stream"
        ),
    )
    op.create_index(
        "ix_rollout_devices_device_stream",
        "rollout_devices",
        ["device_id", "stream"],
        unique=False,
    )
    op.create_index(
        "ix_rollout_devices_rollout_stage",
        "rollout_devices",
        ["rollout_id", "stage"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_rollout_devices_rollout_stage", table_name="rollout_devices")
    op.drop_index("ix_rollout_devices_device_stream", table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index("ix_device_desired_published", table_name="device_desired")
    op.drop_table("device_desired")
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")
