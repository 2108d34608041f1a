"""Shared fixtures: a real Mosquitto per test, the shipped assets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypothesis
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import ModelRef
from tests.broker import Mosquitto
from tests.ota_support import Bundle, make_bundle
from tests.range_server import RangeServerState, range_server

if TYPE_CHECKING:
    from tests.ota_rig import Rig

# Property-based tests draw the same examples on every run: CI must not fail at random on an
# unrelated change. EDGEFLEET_FUZZ_RANDOM=1 explores new examples (run it by hand, longer).
hypothesis.settings.register_profile(
    "edgefleet", derandomize=os.environ.get("EDGEFLEET_FUZZ_RANDOM") != "1"
)
hypothesis.settings.load_profile("edgefleet")

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "inference" / "assets"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker on a free loopback port, stopped after the test."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


# --- OTA: a signing key and signed bundles served over real HTTP --------------------------


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def served(
    tmp_path: Path, key: Ed25519PrivateKey
) -> Iterator[Callable[..., tuple[Bundle, ModelRef, RangeServerState]]]:
    """Serve a bundle variant over real HTTP: ``served(kind=..., version=...)``."""
    servers: list[Any] = []

    def serve(**kw: Any) -> tuple[Bundle, ModelRef, RangeServerState]:
        n = len(servers)
        bundle = make_bundle(tmp_path / f"b{n}.efb", key, **kw)
        state = RangeServerState(body=bundle.body)
        ctx = range_server(state)
        url = ctx.__enter__()
        servers.append(ctx)
        return bundle, bundle.at(url), state

    yield serve
    for ctx in servers:
        ctx.__exit__(None, None, None)


@pytest.fixture
def rig(tmp_path: Path, key: Ed25519PrivateKey) -> Rig:
    """An OTA manager on ``tmp_path`` that trusts ``key``, started on the baseline model, its
    stream simulated (tests/ota_rig.py)."""
    # Imported here, not at the top: tests/ota_rig.py decodes the test video when imported.
    from tests.ota_rig import make_rig

    return make_rig(tmp_path, key)
