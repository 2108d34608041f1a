"""Devices' state counter and status order.

``devices.state_seq`` counts the status and reported-state writes of a device, so the
rollout engine re-derives only the executions whose device changed since its last tick
(``controller.rollouts.watch``). ``devices.status_seq`` is the stored status's ``seq``
(``protocol.Status.seq``): a status of the same agent process with a lower one is older and
is not written (several replicas may commit a device's statuses out of order).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite has it, with a constant default): a batch "move and copy" of
    # devices would drop the table, and with foreign keys on that cascades to every row that
    # references a device.
    op.add_column(
        "devices", sa.Column("state_seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column("devices", sa.Column("status_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("devices", "status_seq")  # SQLite >= 3.35: a real DROP COLUMN
    op.drop_column("devices", "state_seq")
