"""Bundle chunks: model bundles stored in the database (``models.storage = "database"``).

A bundle is split into rows of ``models.chunk_bytes`` (1 MiB) keyed by its sha256 and the
offset of each chunk, so any replica streams it and answers byte ranges without reading it
whole. On PostgreSQL the column is stored without compression (bundles are compressed
already; TOAST would only spend CPU).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 05:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bundle_chunks",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("pos", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "pos", name=op.f("pk_bundle_chunks")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE bundle_chunks ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("bundle_chunks")
