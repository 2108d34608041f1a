"""``python -m tools.simulator``: the command line of :mod:`tools.simulator.cli`."""

import sys

from tools.simulator.cli import main

sys.exit(main())
