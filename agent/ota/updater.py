"""The per-stream OTA state machine (docs/ota.md), with every side effect injected.

``idle → downloading → verifying → staging → switching → probation → committed``, or
``failed(reason)`` before the candidate went live, or ``rolled_back(reason)`` after. Each
transition is persisted (:mod:`agent.ota.state`) *before* its step runs, so a restart can tell
where it stopped (:mod:`agent.ota.manager` does the recovery).

A :class:`StreamUpdater` owns one worker thread; :meth:`StreamUpdater.submit` hands it a
:class:`Job` (a target model, or None for the stream's baseline) and returns at once. A job
for another target cancels the running one: a download stops between chunks, staging is
dropped, a candidate in probation is swapped back out (``rolled_back``, reason
``superseded``). The current model keeps serving until the swap, and the old detector stays
loaded during probation so a rollback is an instant swap back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.ota.deploy import Deployment
from agent.ota.services import Cancelled, Details, Job, OtaEvent, Outcome, Services, StreamIO
from agent.ota.state import StreamState, save_stream_state
from protocol import EventLevel, GateEvidence
from protocol.messages import DeploymentPhase

__all__ = ["StreamUpdater"]

log = logging.getLogger(__name__)

_LEVELS: dict[str, EventLevel] = {"committed": "info", "failed": "error", "rolled_back": "warning"}


class StreamUpdater:
    """Runs the deployments of one stream, one job at a time, on its own thread."""

    def __init__(
        self,
        io: StreamIO,
        services: Services,
        *,
        state: StreamState,
        on_change: Callable[[], None],
        emit: Callable[[OtaEvent], None],
    ) -> None:
        self.io = io
        self.name = io.name
        self._svc = services
        self._state = state
        self._on_change = on_change
        self._emit = emit
        self._cond = threading.Condition()
        self._pending: Job | None = None
        self._running: Job | None = None
        self.cancel_event = threading.Event()
        self.cancel_reason = "superseded"
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"ota-{self.name}", daemon=True)
        self._deployment = Deployment(io, services, self)

    # -- control -------------------------------------------------------------------------

    @property
    def state(self) -> StreamState:
        with self._cond:
            return self._state

    @property
    def queued(self) -> Job | None:
        """The job taken up but not started yet (reported as phase ``idle`` with its target):
        the pending one, or the running one before its first phase is recorded (until then
        the state still holds the previous deployment's outcome)."""
        with self._cond:
            if self._pending is not None:
                return self._pending
            running = self._running
            if running is not None and self._state.rev != running.rev:
                return running
            return None

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._pending is not None or self._running is not None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` (replacing a queued one); a running job for another target stops."""
        with self._cond:
            running = self._running
            if running is not None and _same_target(running, job) and not job.resume:
                self._pending = None
                return
            self._pending = job
            if running is not None:
                self.cancel_reason = "superseded"
                self.cancel_event.set()
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; a deployment in progress stays persisted for the next start."""
        with self._cond:
            self._stopping = True
            self._pending = None
            self.cancel_reason = "stopping"
            self.cancel_event.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job: Job | None = self._pending
                self._pending = None
                self._running = job
                self.cancel_event.clear()
            if job is None:
                continue
            try:
                with self._cond:
                    self._state = self._state.evolve(gate=None)  # a new deployment's evidence
                self._deployment.run(job)
            except Cancelled:
                log.info("stream %s: deployment stopped (%s)", self.name, self.cancel_reason)
            except Exception as err:  # a bug or a full disk must not kill the worker
                log.exception("stream %s: OTA step failed unexpectedly", self.name)
                try:
                    self.finish(
                        job,
                        "failed",
                        "internal_error",
                        f"internal error during the update ({err!r}); see the agent log",
                    )
                except Exception:
                    log.exception("stream %s: cannot record the failure", self.name)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def record(
        self,
        phase: Outcome,
        reason: str | None,
        message: str,
        *,
        target_ref: str | None = None,
    ) -> None:
        """Persist and report an outcome decided outside a job (restart recovery)."""
        state = self.state.evolve(phase=phase, reason=reason, message=message)
        if target_ref is not None and target_ref != state.target_ref:
            state = state.evolve(target=None, baseline=False, target_ref=target_ref)
        self._set(state)
        self._event(state, phase, _LEVELS[phase], message, None)
        log.warning("stream %s: %s %s: %s", self.name, phase, state.target_ref, message)

    def show_evidence(self, evidence: GateEvidence) -> None:
        """Persist and report the health gate's evidence so far (no event)."""
        self._set(self.state.evolve(gate=evidence))

    # -- state and events ----------------------------------------------------------------

    def _set(self, state: StreamState) -> None:
        state = state.evolve(updated_at=self._svc.clock())
        save_stream_state(self._svc.ota_dir, self.name, state)
        with self._cond:
            self._state = state
        self._on_change()

    def _base(self, job: Job) -> StreamState:
        if job.target is None:
            target_ref = self.io.baseline_ref
        else:
            target_ref = f"{job.target.name}@{job.target.version}"
        return self.state.evolve(
            target=job.target,
            baseline=job.target is None,
            target_ref=target_ref,
            rev=job.rev,
            rollout_id=job.rollout_id,
            reason=None,
            message=None,
        )

    def enter(
        self,
        job: Job,
        phase: DeploymentPhase,
        message: str,
        *,
        from_slot: str | None = None,
        details: Details | None = None,
    ) -> None:
        """Persist ``phase`` (before its step runs), report it, then the fault hook."""
        state = self._base(job).evolve(phase=phase, message=message)
        if phase == "switching":
            state = state.evolve(from_slot=from_slot)
        self._set(state)
        log.info("stream %s: %s %s: %s", self.name, phase, state.target_ref, message)
        self._event(state, phase, _LEVELS.get(phase, "info"), message, details)
        self._svc.fault(phase)
        self.check()

    def finish(
        self,
        job: Job,
        phase: Outcome,
        reason: str | None,
        message: str,
        details: Details | None = None,
    ) -> None:
        state = self._base(job).evolve(phase=phase, reason=reason, message=message)
        self._set(state)
        self._event(state, phase, _LEVELS[phase], message, details)
        log_fn = log.info if phase == "committed" else log.warning
        log_fn("stream %s: %s %s: %s", self.name, phase, state.target_ref, message)
        if job.target is not None:
            self._svc.download_path(job.target).unlink(missing_ok=True)

    def _event(
        self,
        state: StreamState,
        phase: DeploymentPhase,
        level: EventLevel,
        message: str,
        details: Details | None,
    ) -> None:
        self._emit(
            OtaEvent(
                code=f"ota.{phase}",
                level=level,
                message=message,
                stream=self.name,
                phase=phase,
                details={
                    "rev": state.rev,
                    "rollout_id": state.rollout_id,
                    "target": state.target_ref,
                    "reason": state.reason,
                    **(details or {}),
                },
            )
        )

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled


def _same_target(a: Job, b: Job) -> bool:
    if a.target is None or b.target is None:
        return a.target is None and b.target is None
    return (a.target.name, a.target.version, a.target.sha256.lower()) == (
        b.target.name,
        b.target.version,
        b.target.sha256.lower(),
    )
