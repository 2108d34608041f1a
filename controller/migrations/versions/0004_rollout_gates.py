"""Rollout gates: per-rollout health-gate overrides and the gate's evidence from devices.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 10:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("gate", sa.JSON(none_as_null=True), nullable=True))
    op.add_column(
        "rollout_devices", sa.Column("evidence", sa.JSON(none_as_null=True), nullable=True)
    )
    op.add_column("device_streams", sa.Column("gate", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    op.drop_column("device_streams", "gate")
    op.drop_column("rollout_devices", "evidence")
    op.drop_column("rollouts", "gate")
