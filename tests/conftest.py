"""Shared fixtures: a real Mosquitto per test, the shipped assets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Mosquitto

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "agent" / "assets"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker on a free loopback port, stopped after the test."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS
