"""Load the repository's stand-alone scripts (requirements/check.py, packaging/deb/build.py).

They are run as files, not imported from a package (a top-level ``packaging`` package would
shadow the PyPI library of that name), so the tests load them by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load(relpath: str) -> ModuleType:
    """The script at ``REPO/relpath`` as a module (loaded once, kept in sys.modules)."""
    name = "edgefleet_script_" + relpath.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    assert spec is not None and spec.loader is not None, relpath
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
