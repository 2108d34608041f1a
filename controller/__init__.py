"""edgefleet controller: fleet state in SQLite/PostgreSQL, MQTT ingestion, HTTP API, CLI.

Imports only ``protocol``. The composition root is ``controller.service.build_controller``;
the operator CLI is ``controller.cli:main`` (``edgefleet``).
"""

from controller.errors import ControllerError

__all__ = ["ControllerError"]
