"""Alembic migrations of the controller database, run from code (see controller.db.session)."""
