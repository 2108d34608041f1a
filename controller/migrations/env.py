"""Alembic environment: runs on the Connection that controller.db.session passes in.

There is no alembic.ini; ``controller.db.session.alembic_config`` builds the Config in
code. To write a new revision after changing the models::

    .venv/bin/python -m controller.migrations.new "what changed"
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from controller.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if not isinstance(connection, Connection):  # pragma: no cover - misuse guard
    raise RuntimeError(
        "run the controller migrations through controller.db.session.upgrade(), "
        "or `edgefleet db upgrade`, not the alembic command line"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
