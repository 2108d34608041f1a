"""Console: the latest telemetry summary on devices and streams, and camera snapshots.

The fleet page sorts and filters 10,000 devices by CPU, temperature, fps and latency: the
latest values are kept on the rows (written with each telemetry message) instead of being
looked up in the telemetry history per device. ``device_snapshots`` keeps the latest JPEG
per stream (agent ``[snapshots]``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite has it): a batch "move and copy" of devices would drop the
    # table, and with foreign keys on that cascades to every row that references a device.
    for column in ("cpu_percent", "mem_percent", "temp_c"):
        op.add_column("devices", sa.Column(column, sa.Double(), nullable=True))
    op.create_index(op.f("ix_devices_last_seen"), "devices", ["last_seen"])
    for column in ("fps", "infer_ms_p95", "latency_ms_p95"):
        op.add_column("device_streams", sa.Column(column, sa.Double(), nullable=True))
    op.create_table(
        "device_snapshots",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("detections", sa.JSON(), nullable=False),
        sa.Column("jpeg", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_snapshots_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "stream", name=op.f("pk_device_snapshots")),
    )


def downgrade() -> None:
    op.drop_table("device_snapshots")
    for column in ("latency_ms_p95", "infer_ms_p95", "fps"):
        op.drop_column("device_streams", column)  # SQLite >= 3.35: a real DROP COLUMN
    op.drop_index(op.f("ix_devices_last_seen"), table_name="devices")
    for column in ("temp_c", "mem_percent", "cpu_percent"):
        op.drop_column("devices", column)
