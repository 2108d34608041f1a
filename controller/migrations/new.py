"""Write a new Alembic revision by comparing the models with a scratch SQLite database.

Usage: ``python -m controller.migrations.new "add rollouts"`` (review the file it writes).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from alembic import command

    from controller.db.session import alembic_config, make_engine, upgrade

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print('usage: python -m controller.migrations.new "message"', file=sys.stderr)
        return 2
    versions = Path(__file__).resolve().parent / "versions"
    number = len(list(versions.glob("[0-9][0-9][0-9][0-9]_*.py"))) + 1
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/scratch.db")
        upgrade(engine)
        with engine.begin() as conn:
            command.revision(
                alembic_config(conn),
                message=args[0],
                autogenerate=True,
                rev_id=f"{number:04d}",
            )
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
