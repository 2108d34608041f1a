"""The steps of one deployment (docs/ota.md): download, verify, stage, shadow, switch,
probation.

:class:`Deployment` runs a :class:`~agent.ota.services.Job` for one stream and records every
transition through its :class:`~agent.ota.services.Journal` (the stream's updater, which persists each phase
*before* the step runs). Failures before the swap end in ``failed(reason)`` and the current
model never stops serving; after the swap the old detector stays loaded, so a failed
probation is an instant swap back (``rolled_back(reason)``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
from pathlib import Path

from agent.errors import AgentError
from agent.ota import OtaError
from agent.ota.bundle import extract
from agent.ota.gate import GateResult, GateRules, evaluate
from agent.ota.gate_policy import GateFailed, evidence_details, gate_message, rules_for
from agent.ota.probation import WARMUP_FRAMES, Health, Verdict, check_errors, judge
from agent.ota.services import Cancelled, Details, Job, Journal, Services, StreamIO
from agent.ota.shadow import PairLog, ShadowRunner
from inference.detector import Detector
from inference.errors import InferenceError
from protocol import Manifest, ModelRef

__all__ = ["PROBATION_TICK_S", "Deployment"]

log = logging.getLogger(__name__)

PROBATION_TICK_S = 0.25
"""How often probation looks at the live numbers (inference errors end it early)."""
GATE_TICK_S = 0.5
"""How often the shadow phase evaluates its pairs."""
EVIDENCE_EVERY_S = 5.0
"""How often the growing evidence is persisted and reported (retained ``reported``)."""


class Deployment:
    """Runs jobs for one stream; ``journal`` persists, reports and can cancel."""

    def __init__(self, io: StreamIO, services: Services, journal: Journal) -> None:
        self.io = io
        self._svc = services
        self._j = journal

    def run(self, job: Job) -> None:
        """Deploy ``job``; outcomes are recorded through the journal, cancellation raises."""
        if job.target is None:
            self._to_baseline(job)
            return
        ref = job.target
        target_ref = f"{ref.name}@{ref.version}"
        if not job.resume and self.io.active() == target_ref:
            self._j.finish(job, "committed", None, f"{target_ref} is already the active model")
            return
        if self._svc.keys_problem is not None:
            reason, message = self._svc.keys_problem
            self._j.finish(job, "failed", reason, message)
            return
        resume_at = self._j.state.phase if job.resume else "downloading"
        try:
            efb = self._download(job, ref, resume_at)
            folder = self._svc.work / f"{ref.sha256.lower()[:16]}.{secrets.token_hex(4)}"
            try:
                manifest = self._verify(job, ref, efb, folder)
                staged = self._install(job, folder, manifest)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            candidate = self._stage(staged, manifest)
            rules, undecided = rules_for(ref, self._svc.gate, self._svc.undecided)
            pairs = PairLog()
            if rules.compare and self._svc.shadow_max_s > 0:
                self._shadow(job, staged, candidate, rules, undecided, pairs)
            self._switch(job, staged, candidate, rules, pairs)
        except OtaError as err:
            gate = self._j.state.gate if isinstance(err, GateFailed) else None
            details = evidence_details(gate) if gate is not None else None
            self._j.finish(job, "failed", err.reason, str(err), details)

    def _download(self, job: Job, ref: ModelRef, resume_at: str) -> Path:
        efb = self._svc.download_path(ref)
        if resume_at != "downloading" and _complete(efb, ref):
            return efb
        self._j.enter(
            job, "downloading", f"downloading {ref.name}@{ref.version} ({ref.size} bytes)"
        )
        self._svc.downloads.mkdir(parents=True, exist_ok=True)
        try:
            return self._svc.download(ref, efb, self._j.cancel_event)
        except OtaError as err:
            if err.reason == "cancelled":
                raise Cancelled from err
            raise

    def _verify(self, job: Job, ref: ModelRef, efb: Path, folder: Path) -> Manifest:
        """Check the bundle completely, then extract it into ``folder``."""
        self._j.enter(job, "verifying", f"verifying {efb.name}")
        verified = self._svc.verify(efb)
        manifest = verified.manifest
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise OtaError(
                "bad_manifest",
                f"the bundle contains {manifest.ref}, the desired state asks for "
                f"{ref.name}@{ref.version}: fix the model registry entry",
            )
        if ref.signature is not None and ref.signature.strip() != verified.signature:
            raise OtaError(
                "bad_signature",
                f"the bundle's manifest.sig differs from the desired state's signature for "
                f"{manifest.ref}: the bundle was replaced; republish it",
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        extract(verified, folder)
        self._j.check()
        return manifest

    def _install(self, job: Job, folder: Path, manifest: Manifest) -> Path:
        self._j.enter(job, "staging", f"installing {manifest.ref} next to the running model")
        return self._svc.store.install(self.io.name, folder, move=True)

    def _stage(self, staged: Path, manifest: Manifest) -> Detector:
        """Load the staged candidate (this thread; the current model keeps serving) and run
        its golden samples and latency budget."""
        try:
            self._j.check()
            candidate = self.io.load(staged / "manifest.json")
        except (AgentError, InferenceError) as err:
            self._svc.store.discard(self.io.name, staged)
            raise OtaError(
                "load_failed", f"{manifest.ref} cannot be loaded: {err}; it was not installed"
            ) from err
        except BaseException:
            self._svc.store.discard(self.io.name, staged)
            raise
        try:
            self._j.check()
            report = self._svc.golden(candidate, staged, manifest)
            self._j.check()
        except BaseException:
            candidate.close()
            self._svc.store.discard(self.io.name, staged)
            raise
        if not report.ok:
            candidate.close()
            self._svc.store.discard(self.io.name, staged)
            first = report.failures[0]
            where = f" on {first.image}" if first.image else ""
            raise OtaError(
                report.reason or "golden_mismatch",
                f"{manifest.ref} failed its check{where}: {first.detail}; it was not "
                "installed, fix the model or its golden samples",
            )
        return candidate

    def _attach(self, model: Detector, pairs: PairLog, *, shadow_is_candidate: bool) -> None:
        """Run ``model`` in the stream's shadow, recording into ``pairs``."""
        svc = self._svc
        runner = ShadowRunner(
            model,
            pairs,
            shadow_is_candidate=shadow_is_candidate,
            interval_s=svc.shadow_interval_s,
            cpu_share=svc.shadow_cpu_share,
            clock=svc.monotonic,
        )
        try:
            self.io.shadow(runner)
        except (AgentError, InferenceError) as err:
            raise OtaError(
                "stream_not_running",
                f"the stream cannot run a shadow model ({err}); fix the stream and deploy again",
            ) from err

    def _shadow(
        self,
        job: Job,
        staged: Path,
        candidate: Detector,
        rules: GateRules,
        undecided: str,
        pairs: PairLog,
    ) -> None:
        """Run the candidate beside the current model until the gate decides; OtaError (the
        candidate closed, the staged install discarded) when it must not go live."""
        svc = self._svc
        try:
            self._j.enter(
                job,
                "shadow",
                f"comparing {candidate.ref} with {self.io.active()} on the same live frames "
                f"(at most {svc.shadow_max_s:g} s)",
            )
            self._attach(candidate, pairs, shadow_is_candidate=True)
            try:
                result = self._watch(pairs, rules, "shadow", svc.shadow_max_s)
            finally:
                self.io.shadow(None)
        except BaseException:
            candidate.close()
            svc.store.discard(self.io.name, staged)
            raise
        if result.verdict == "pass" or (result.verdict == "undecided" and undecided == "commit"):
            return
        candidate.close()
        svc.store.discard(self.io.name, staged)
        reason = f"shadow_{result.reason or 'inconclusive'}"
        evidence = result.evidence("shadow", rules, reason=reason)
        self._j.show_evidence(evidence)
        raise GateFailed(reason, gate_message(candidate.ref, result, rules, svc.shadow_max_s))

    def _watch(self, pairs: PairLog, rules: GateRules, stage: str, max_s: float) -> GateResult:
        """Evaluate the pairs until a verdict or ``max_s``; report the evidence as it grows."""
        svc = self._svc
        deadline = svc.monotonic() + max_s
        shown = 0.0
        while True:
            result = evaluate(pairs.snapshot(), rules)
            now = svc.monotonic()
            if result.verdict != "undecided" or now >= deadline:
                self._j.show_evidence(result.evidence(stage, rules, reason=None))
                return result
            if now - shown >= EVIDENCE_EVERY_S:
                self._j.show_evidence(result.evidence(stage, rules, reason=None))
                shown = now
            if svc.wait(min(GATE_TICK_S, max(0.0, deadline - now)), self._j.cancel_event):
                raise Cancelled

    def _switch(
        self, job: Job, staged: Path, candidate: Detector, rules: GateRules, pairs: PairLog
    ) -> None:
        store = self._svc.store
        from_slot = store.slots(self.io.name)[0]
        try:
            self._j.enter(job, "switching", f"switching to {candidate.ref}", from_slot=from_slot)
        except BaseException:
            candidate.close()
            store.discard(self.io.name, staged)
            raise
        old_ref = self.io.active()
        window = max(self._svc.probation_s, 1.0)
        baseline = self.io.health.baseline(old_ref, window) if old_ref else _EMPTY
        store.activate(self.io.name, staged)
        self._svc.fault("activated")
        try:
            old = self.io.swap(candidate)
        except (AgentError, InferenceError) as err:
            store.revert(self.io.name)
            candidate.close()
            raise OtaError(
                err.reason if isinstance(err, OtaError) else "swap_timeout",
                f"{candidate.ref} could not be swapped in ({err}); the current model keeps running",
            ) from err
        started = self._svc.monotonic()
        try:
            self._j.enter(
                job,
                "probation",
                f"{candidate.ref} is live; watching it for {self._svc.probation_s:g} s",
                details={f"baseline_{k}": v for k, v in _numbers(baseline).items()},
            )
            verdict = self._probation(candidate.ref, baseline, started, old, rules, pairs)
        except Cancelled:
            if self._j.cancel_reason == "stopping":
                old.close()  # the candidate stays live; the next start rolls it back
                raise
            verdict = Verdict("superseded", "a newer desired state replaced this deployment", {})
        except Exception as err:  # e.g. the state file cannot be written: do not keep it live
            log.exception("stream %s: probation failed", self.io.name)
            verdict = Verdict(
                "internal_error", f"probation could not run ({err!r}); the old model is back", {}
            )
        if verdict.ok:
            old.close()
            self._j.finish(
                job,
                "committed",
                None,
                f"{candidate.ref} passed probation: {verdict.message}",
                verdict.details,
            )
            return
        self._swap_back(old)
        store.revert(self.io.name)
        self._j.finish(job, "rolled_back", verdict.reason, verdict.message, verdict.details)

    def _probation(
        self,
        model: str,
        baseline: Health,
        started: float,
        old: Detector,
        rules: GateRules,
        pairs: PairLog,
    ) -> Verdict:
        """Errors and fps of the live candidate; the old model in the shadow continues the
        paired test (only a ``fail`` of it rolls back)."""
        svc = self._svc
        deadline = started + svc.probation_s
        paired = rules.compare
        if paired:
            try:
                self._attach(old, pairs, shadow_is_candidate=False)
            except OtaError as err:
                log.warning("stream %s: no pairing in probation: %s", self.io.name, err)
                paired = False
        shown = 0.0
        try:
            while True:
                now = svc.monotonic()
                live = self.io.health.since(model, started, now, warmup=WARMUP_FRAMES)
                early = check_errors(baseline, live, svc.thresholds)
                if early is not None:
                    return early
                result = evaluate(pairs.snapshot(), rules) if paired else None
                if result is not None and result.verdict == "fail":
                    reason = f"probation_{result.reason}"
                    evidence = result.evidence("probation", rules, reason=reason)
                    self._j.show_evidence(evidence)
                    message = gate_message(model, result, rules, None)
                    return Verdict(reason, message, evidence_details(evidence))
                if result is not None and (now - shown >= EVIDENCE_EVERY_S or now >= deadline):
                    self._j.show_evidence(result.evidence("probation", rules, reason=None))
                    shown = now
                if now >= deadline:
                    verdict = judge(baseline, live, svc.thresholds)
                    state = self._j.state.gate
                    if verdict.ok and state is not None:
                        details = {**verdict.details, **evidence_details(state)}
                        return Verdict(None, f"{verdict.message}; {state.summary}", details)
                    return verdict
                if svc.wait(min(PROBATION_TICK_S, deadline - now), self._j.cancel_event):
                    raise Cancelled
        finally:
            if paired:
                self.io.shadow(None)

    def _swap_back(self, old: Detector) -> None:
        for attempt in range(3):
            try:
                self.io.swap(old).close()
                return
            except (AgentError, InferenceError) as err:
                log.error(
                    "stream %s: swap back failed (attempt %d): %s", self.io.name, attempt, err
                )
        log.error(
            "stream %s: the candidate cannot be swapped out; the store was rolled back, "
            "restart the agent to run the previous model",
            self.io.name,
        )

    def _to_baseline(self, job: Job) -> None:
        store = self._svc.store
        state = self._j.state
        current = store.slots(self.io.name)[0]
        if current is None:
            if state.phase != "idle" or state.target_ref is not None:
                self._j.finish(job, "committed", None, "the baseline model is active")
            return
        self._j.enter(job, "switching", "switching back to the baseline model", from_slot=current)
        try:
            detector = self.io.load(self.io.baseline_manifest)
        except (AgentError, InferenceError) as err:
            self._j.finish(
                job,
                "failed",
                "load_failed",
                f"the baseline model {self.io.baseline_manifest} cannot be loaded ({err}); the "
                "current model keeps running: fix the stream's model in the agent config",
            )
            return
        store.deactivate(self.io.name)
        self._svc.fault("activated")
        try:
            old = self.io.swap(detector)
        except (AgentError, InferenceError) as err:
            store.revert(self.io.name)
            detector.close()
            self._j.finish(job, "failed", "swap_timeout", f"cannot swap the model: {err}")
            return
        old.close()
        self._j.finish(job, "committed", None, "back on the baseline model")


_EMPTY = Health(seconds=0.0, frames=0, errors=0, infer_ms_p95=None, frames_with_detection=0)


def _numbers(health: Health) -> Details:
    return {
        "frames": health.frames,
        "fps": round(health.fps, 3) if health.fps is not None else None,
        "infer_ms_p95": health.infer_ms_p95,
        "detection_rate": round(health.detection_rate, 3)
        if health.detection_rate is not None
        else None,
        "errors": health.errors,
    }


def _complete(path: Path, ref: ModelRef) -> bool:
    """``path`` is the finished download of ``ref`` (size and sha256); a bad one is deleted."""
    try:
        if path.stat().st_size != ref.size:
            path.unlink(missing_ok=True)
            return False
    except FileNotFoundError:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != ref.sha256.lower():
        path.unlink(missing_ok=True)
        return False
    return True
