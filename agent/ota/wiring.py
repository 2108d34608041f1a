"""How the daemon wires OTA: the production :class:`~agent.ota.services.Services` and the
fault test hook.

:func:`build_services` turns the ``[ota]`` config into the real download, bundle check (with
the trusted keys) and golden check. :func:`fault_hook_from_env` reads the test hook
``EDGEFLEET_OTA_FAULT`` (comma-separated ``pause:POINT``, POINT a phase name or
``activated``): it makes the agent block forever when a deployment reaches that point, right
after the phase was persisted, so a test can ``kill -9`` it there. Not for production use.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from pathlib import Path

from agent import __version__
from agent.config import OtaConfig
from agent.errors import ConfigError
from agent.ota import OtaError
from agent.ota.bundle import VerifiedBundle, load_trusted_keys, open_bundle
from agent.ota.download import download
from agent.ota.gate import GateRules
from agent.ota.model_store import ModelStore
from agent.ota.probation import Thresholds
from agent.ota.services import FaultHook, Services
from inference.golden import check_golden
from protocol import ModelRef

__all__ = ["FAULT_ENV", "NO_KEYS", "build_services", "fault_hook_from_env"]

log = logging.getLogger(__name__)

FAULT_ENV = "EDGEFLEET_OTA_FAULT"
FAULT_POINTS = frozenset(
    {"downloading", "verifying", "staging", "shadow", "switching", "activated", "probation"}
)
NO_KEYS = (
    "no_trusted_keys",
    "no [ota] trusted_keys configured, so this agent refuses every model update: add the "
    "controller's signing.pub (`edgefleet keys generate`) to [ota] trusted_keys and restart",
)


def fault_hook_from_env(value: str | None) -> FaultHook:
    """The ``EDGEFLEET_OTA_FAULT`` test hook; a no-op when unset."""
    paused: set[str] = set()
    for item in (value or "").split(","):
        if not item.strip():
            continue
        action, _, point = item.strip().partition(":")
        if action != "pause" or point not in FAULT_POINTS:
            raise ConfigError(
                f"{FAULT_ENV}={value!r}: use pause:POINT with POINT one of "
                f"{', '.join(sorted(FAULT_POINTS))} (a test hook; unset it in production)"
            )
        paused.add(point)

    def hook(point: str) -> None:
        if point in paused:
            log.warning("%s: paused at %s for good (test hook)", FAULT_ENV, point)
            while True:
                time.sleep(3600)

    return hook


def build_services(
    config: OtaConfig,
    *,
    ota_dir: Path,
    store: ModelStore,
    key_paths: list[Path],
    runtimes: set[str],
    fault: FaultHook,
) -> Services:
    """The production :class:`Services`: real download, bundle check, golden check."""
    keys_problem: tuple[str, str] | None = None
    keys = []
    if not key_paths:
        keys_problem = NO_KEYS
    else:
        try:
            keys = load_trusted_keys(key_paths)
        except OtaError as err:
            log.error("%s", err)
            keys_problem = (err.reason, str(err))
    arch = platform.machine()

    def fetch(ref: ModelRef, dest: Path, stop: threading.Event) -> Path:
        return download(
            ref.url,
            dest,
            sha256=ref.sha256,
            size=ref.size,
            retries=config.download_retries,
            stop=stop,
        )

    def verify(path: Path) -> VerifiedBundle:
        return open_bundle(
            path, trusted_keys=keys, agent_version=__version__, runtimes=runtimes, arch=arch
        )

    return Services(
        ota_dir=ota_dir,
        store=store,
        download=fetch,
        verify=verify,
        golden=lambda det, folder, manifest: check_golden(
            det, folder, manifest, latency_runs=config.golden_latency_runs
        ),
        thresholds=Thresholds(fps_factor=config.fps_factor, max_errors=config.max_errors),
        probation_s=config.probation_s,
        gate=GateRules(
            min_agreement=config.min_agreement,
            max_latency_ratio=config.max_latency_ratio,
            max_errors=config.max_errors,
            confidence=config.confidence,
        ),
        undecided=config.undecided,
        shadow_max_s=config.shadow_max_s,
        shadow_interval_s=config.shadow_interval_s,
        shadow_cpu_share=config.shadow_cpu_share,
        keys_problem=keys_problem,
        fault=fault,
    )
