"""``python -m controller ...`` is the ``edgefleet`` CLI."""

from controller.cli import main

main(prog_name="edgefleet")
