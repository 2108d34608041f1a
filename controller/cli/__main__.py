"""``python -m controller.cli ...``: the ``edgefleet`` CLI (as ``python -m controller``)."""

from controller.cli import main

main()
