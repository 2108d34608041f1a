"""The device's OTA front: desired state in, reported state and events out, restart recovery.

:class:`OtaManager` owns one :class:`~agent.ota.updater.StreamUpdater` per stream. It takes up
a ``Desired`` message whose ``rev`` is greater than the last one it handled (persisted in
``{ota_dir}/_desired.json``), hands each stream its job, and publishes the retained
``Reported`` state on every phase change. At start (:meth:`OtaManager.recover`, before the
streams load their models) it applies the restart rules of docs/ota.md.
:mod:`agent.ota.wiring` builds its production services.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import AgentError
from agent.ota.model_store import StoreError, verify_installed
from agent.ota.services import Job, OtaEvent, Services, StreamIO
from agent.ota.state import (
    IN_PROGRESS,
    StreamState,
    load_desired,
    load_stream_state,
    same_model,
    save_desired,
)
from agent.ota.updater import StreamUpdater
from inference.errors import InferenceError
from protocol import (
    SCHEMA_VERSION,
    Desired,
    Event,
    EventLevel,
    ProtocolError,
    Reported,
    StreamReport,
    decode,
    decode_manifest,
    encode_checked,
)

__all__ = ["OtaManager"]

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        "download_failed",
        "bad_url",
        "internal_error",
        "swap_timeout",
        "no_trusted_keys",
        "bad_trusted_key",
        "incompatible",
        "load_failed",
        "stream_not_running",
    }
)
"""Failures a new rev (or a restart) retries for the same bundle: they depend on the network
or on this device, not on the bundle's bytes. ``http_*`` failures are retried too."""


class OtaManager:
    """Desired → per-stream jobs; state → retained reported; transitions → events."""

    def __init__(
        self,
        *,
        device_id: str,
        services: Services,
        streams: list[StreamIO],
        publish_reported: Callable[[bytes], None],
        publish_event: Callable[[bytes], None],
        on_change: Callable[[], None] = lambda: None,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.enabled = enabled
        self._svc = services
        self._store = services.store
        self._publish_reported = publish_reported
        self._publish_event = publish_event
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._started = False
        self._refs: dict[Path, str | None] = {}
        desired = load_desired(services.ota_dir) if enabled else None
        self._desired: Desired | None = desired
        self.updaters: dict[str, StreamUpdater] = {
            io.name: StreamUpdater(
                io,
                services,
                state=load_stream_state(services.ota_dir, io.name) if enabled else StreamState(),
                on_change=self.publish_report,
                emit=self._emit,
            )
            for io in streams
        }

    @property
    def desired_rev(self) -> int | None:
        return self._desired.rev if self._desired is not None else None

    # -- start and stop ------------------------------------------------------------------

    def recover(self) -> dict[str, Path | None]:
        """Apply the restart rules; return per stream the manifest to start on (None = baseline).

        Call before the streams load their models. ``switching``/``probation`` at restart:
        the store goes back to the model that was current before the switch and the stream
        reports ``rolled_back`` (``crashed_in_probation``); a switch back to the baseline is
        finished instead. A current install whose files no longer match its manifest is not
        run (the stream starts on its baseline).
        """
        if not self.enabled:
            return dict.fromkeys(self.updaters)
        self._cleanup_work()
        result: dict[str, Path | None] = {}
        for name, updater in self.updaters.items():
            state = updater.state
            if state.phase in ("switching", "probation"):
                current = self._store.slots(name)[0]
                if state.baseline:
                    self._store.deactivate(name)
                    updater.record(
                        "committed", None, "back on the baseline model (after a restart)"
                    )
                else:
                    if current != state.from_slot:
                        self._store.revert(name)
                    updater.record(
                        "rolled_back",
                        "crashed_in_probation",
                        f"the agent stopped while {state.target_ref} was in {state.phase}; it "
                        "did not prove itself and the previous model runs again",
                    )
            manifest = self._store.current(name)
            if manifest is not None:
                try:
                    verify_installed(manifest.parent)
                except StoreError as err:
                    ref = self._ref(manifest)
                    self._store.deactivate(name)
                    updater.record("failed", err.reason, str(err), target_ref=ref)
                    manifest = None
            result[name] = manifest
        return result

    def startup_failed(self, stream: str, error: AgentError | InferenceError) -> None:
        """The installed model of ``stream`` did not load at start: run the baseline instead."""
        manifest = self._store.current(stream)
        ref = self._ref(manifest) if manifest is not None else None
        self._store.deactivate(stream)
        self.updaters[stream].record(
            "failed",
            "load_failed",
            f"installed model {ref} cannot be loaded ({error}); the stream runs its baseline",
            target_ref=ref,
        )

    def start(self) -> None:
        """Start the workers, resume interrupted deployments, take up the persisted desired."""
        self._started = True
        if self.enabled:
            for updater in self.updaters.values():
                updater.start()
            with self._lock:
                for updater in self.updaters.values():
                    state = updater.state
                    entry = self._desired.models.get(updater.name) if self._desired else None
                    if (
                        state.phase in ("downloading", "verifying", "staging", "shadow")
                        and state.target is not None
                        and (self._desired is None or same_model(state.target, entry))
                    ):
                        updater.submit(Job(state.target, state.rev, state.rollout_id, resume=True))
                    elif self._desired is not None:
                        self._reconcile(updater, self._desired)
        self.publish_report()

    def stop(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        for updater in self.updaters.values():
            updater.stop(timeout=max(0.05, deadline - time.monotonic()))

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(
            u.wait_idle(max(0.0, deadline - time.monotonic())) for u in self.updaters.values()
        )

    # -- desired state -------------------------------------------------------------------

    def handle_desired(self, payload: bytes) -> None:
        """A message on the desired topic (paho's thread: returns quickly)."""
        if not self.enabled or not payload:
            return
        try:
            desired = decode(payload, Desired)
        except ProtocolError as err:
            log.warning("ignoring a desired state: %s", err)
            self._emit_device(
                "ota.bad_desired", "error", f"{err}; fix the controller's desired state"
            )
            return
        with self._lock:
            last = self.desired_rev
            if last is not None and desired.rev <= last:
                log.debug("desired rev %d already handled (last %d)", desired.rev, last)
                return
            save_desired(self._svc.ota_dir, desired)
            self._desired = desired
            log.info("took up desired rev %d (rollout %s)", desired.rev, desired.rollout_id)
            unknown = sorted(set(desired.models) - set(self.updaters))
            if unknown:
                self._emit_device(
                    "ota.unknown_stream",
                    "warning",
                    f"desired rev {desired.rev} names stream(s) {unknown} that this device does "
                    f"not run (it has {sorted(self.updaters)}); they are ignored",
                )
            for updater in self.updaters.values():
                self._reconcile(updater, desired)
        self.publish_report()

    def _reconcile(self, updater: StreamUpdater, desired: Desired) -> None:
        entry = desired.models.get(updater.name)
        state = updater.state
        job = Job(entry, desired.rev, desired.rollout_id)
        if entry is None:
            on_baseline = self._store.slots(updater.name)[0] is None
            settled = state.target_ref is None or (state.baseline and state.phase == "committed")
            if on_baseline and state.phase not in IN_PROGRESS and settled:
                return
            updater.submit(job)
            return
        if same_model(state.target, entry):
            if state.phase in IN_PROGRESS:
                return  # already on it
            if state.phase == "committed" and updater.io.active() == state.target_ref:
                return
            if state.phase in ("failed", "rolled_back") and not _retryable(state.reason):
                return  # the same bytes would fail the same way
        updater.submit(job)

    # -- reported state and events -------------------------------------------------------

    def report(self) -> Reported:
        streams: dict[str, StreamReport] = {}
        for name, updater in self.updaters.items():
            state = updater.state
            baseline = updater.io.baseline_ref
            current = self._ref(self._store.current(name)) if self.enabled else None
            previous = self._ref(self._store.previous(name)) if self.enabled else None
            if current is not None and previous is None:
                previous = baseline
            installed = [r for r in dict.fromkeys([baseline, current, previous]) if r]
            phase, target, reason = state.phase, state.target_ref, state.reason
            gate = state.gate
            queued = updater.queued
            if queued is not None and not queued.resume:
                # Taken up for the reported desired_rev but not started: never the outcome of
                # an earlier deployment, which the controller would count for this rev.
                phase, reason, gate = "idle", None, None
                target = (
                    f"{queued.target.name}@{queued.target.version}" if queued.target else baseline
                )
            streams[name] = StreamReport(
                active=updater.io.active(),
                previous=previous,
                installed=installed,
                phase=phase,
                target=target,
                reason=reason,
                gate=gate,
            )
        return Reported(
            schema=SCHEMA_VERSION,
            device_id=self.device_id,
            ts=self._clock(),
            desired_rev=self.desired_rev,
            streams=streams,
        )

    def publish_report(self) -> None:
        if not self._started:
            return
        with self._report_lock:
            self._publish_reported(encode_checked(self.report(), fit=True))
        self._on_change()

    def _emit(self, event: OtaEvent) -> None:
        self._publish_event(
            encode_checked(
                Event(
                    schema=SCHEMA_VERSION,
                    device_id=self.device_id,
                    ts=self._clock(),
                    code=event.code,
                    level=event.level,
                    message=event.message,
                    stream=event.stream,
                    phase=event.phase,
                    details=event.details,
                ),
                fit=True,
            )
        )

    def _emit_device(self, code: str, level: EventLevel, message: str) -> None:
        self._publish_event(
            encode_checked(
                Event(
                    schema=SCHEMA_VERSION,
                    device_id=self.device_id,
                    ts=self._clock(),
                    code=code,
                    level=level,
                    message=message,
                ),
                fit=True,
            )
        )

    def _ref(self, manifest: Path | None) -> str | None:
        if manifest is None:
            return None
        if manifest not in self._refs:
            try:
                self._refs[manifest] = verify_manifest_ref(manifest)
            except (OSError, ProtocolError):
                return None
        return self._refs[manifest]

    def _cleanup_work(self) -> None:
        """Remove extraction leftovers and downloads no deployment in progress needs."""
        shutil.rmtree(self._svc.work, ignore_errors=True)
        downloads = self._svc.downloads
        if not downloads.is_dir():
            return
        keep = {
            f"{u.state.target.sha256.lower()}.efb"
            for u in self.updaters.values()
            if u.state.target is not None
            and (u.state.phase in IN_PROGRESS or _retryable(u.state.reason))
        }
        for path in downloads.iterdir():
            if path.name.removesuffix(".part") not in keep:
                path.unlink(missing_ok=True)


def verify_manifest_ref(manifest: Path) -> str:
    return decode_manifest(manifest.read_bytes()).ref


def _retryable(reason: str | None) -> bool:
    return reason is not None and (reason in RETRYABLE or reason.startswith("http_"))
