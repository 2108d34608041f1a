"""Database models, engines and migrations of the controller."""

from controller.db.session import Database, make_engine, upgrade

__all__ = ["Database", "make_engine", "upgrade"]
