"""The rollout engine: one idempotent, restart-safe ``tick(now)`` over the database.

Every piece of engine state lives in the database (``rollouts``, ``rollout_devices``,
``device_desired``); a tick reads it, decides, and writes the result in one transaction
per rollout, so a controller killed at any point continues where the last committed tick
left it, and running ``tick`` twice at the same ``now`` changes nothing the second time.
The decisions themselves are pure functions (``derive_status``, ``abort_reason``, and the
health comparison in ``controller.rollouts.health``) that the tests call directly.

I/O at the edges: the clock is injected, the database is the store, and publishing the
desired states it writes (``device_desired.published`` false) is the publisher's job
(``controller.rollouts.publisher``). The contract is docs/ota.md, "Rollouts".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from controller.db.session import Database
from controller.fleet.registry import get_model_by_id
from controller.rollouts import executions, records
from controller.rollouts.decisions import (
    IN_FLIGHT,
    abort_reason,
    bundle_url,
    derive_status,
    model_ref,
    next_status,
    ref_name,
)
from controller.rollouts.desired import read_desired, write_desired
from controller.rollouts.faults import DeviceFault
from controller.rollouts.health import (
    HealthPolicy,
    change_windows,
    control_windows,
    device_change,
    judge,
    telemetry_queries,
)
from controller.rollouts.locks import lock_rollout
from controller.rollouts.records import FAILURES, FINISHED, RolloutInfo
from controller.rollouts.watch import SUCCEEDED_EVERY_S, WatchedVersions
from protocol.messages import FAILED_PHASES

__all__ = [
    "SUCCEEDED_EVERY_S",
    "RolloutEngine",
    "TickReport",
    "abort_reason",
    "bundle_url",
    "derive_status",
    "model_ref",
    "next_status",
    "ref_name",
]

log = logging.getLogger(__name__)

# --- the engine ---------------------------------------------------------------------------


@dataclass(slots=True)
class TickReport:
    """What one tick did (for logs, tests and the benchmark)."""

    rollouts: int = 0
    assigned: int = 0
    """Executions given their desired state."""
    rolled_back: int = 0
    rederived: int = 0
    """Executions read and re-derived from their reports (``controller.rollouts.watch``)."""
    desired_written: int = 0
    """Devices whose desired state changed (the publisher has work)."""
    errors: int = 0
    events: list[str] = field(default_factory=list)


class RolloutEngine:
    """Drives every rollout one step per ``tick``; see the module doc."""

    def __init__(
        self,
        db: Database,
        *,
        base_url: Callable[[], str | None],
        clock: Callable[[], float] = time.time,
        health: HealthPolicy | None = None,
    ) -> None:
        """``base_url``: the API URL devices download from (None while not known yet: stages
        wait to be assigned)."""
        self.db = db
        self.base_url = base_url
        self.clock = clock
        self.health = health or HealthPolicy()
        self._health_at: dict[int, float] = {}
        self._versions = WatchedVersions()

    def tick(self, now: float | None = None) -> TickReport:
        """One step of every live rollout (and pending rollbacks), one transaction each."""
        at = self.clock() if now is None else now
        report = TickReport()
        with self.db.connect() as conn:
            ids = records.rollouts_to_tick(conn)
        for rollout_id in ids:
            report.rollouts += 1
            try:
                with self.db.begin() as conn:
                    self._tick_one(conn, rollout_id, at, report)
            except Exception:
                report.errors += 1
                log.exception("rollout %d: tick failed; retrying on the next tick", rollout_id)
        for rid in [r for r in self._health_at if r not in ids]:
            del self._health_at[rid]
        self._versions.keep_only(ids)
        return report

    # --- one rollout --------------------------------------------------------------------

    def _tick_one(self, conn: Connection, rollout_id: int, now: float, report: TickReport) -> None:
        if not lock_rollout(conn, rollout_id):
            return
        r = records.get_rollout(conn, rollout_id)
        if r is None:
            return
        if r.live:
            self._live(conn, r, now, report)
        elif r.state in ("aborted", "rolled_back") and r.rolled_back_at is None:
            self._roll_back(conn, r, now, report)

    def _live(self, conn: Connection, r: RolloutInfo, now: float, report: TickReport) -> None:
        self._refresh(conn, r, now, report)
        counts = records.stage_counts(conn, r.id)
        why = abort_reason(r, counts) or self._health_check(conn, r, now, force=False)
        if why is not None:
            self._abort(conn, r, now, *why, report=report)
            return
        stage = r.current_stage
        if r.stage_started_at is None:
            if r.state == "active":
                self._assign(conn, r, stage, now, report)
            return
        c = counts.get(stage, {})
        if any(c.get(s, 0) for s in IN_FLIGHT):
            return
        done_at = r.stage_done_at
        if done_at is None:
            done_at = now
            records.update_rollout(conn, r.id, stage_done_at=now, updated_at=now)
            report.events.append(f"rollout {r.id}: stage {stage + 1} done, baking {r.bake_s:g}s")
            log.info(
                "rollout %d: stage %d/%d done; baking for %gs",
                r.id,
                stage + 1,
                len(r.stages),
                r.bake_s,
            )
        if r.state != "active" or now < done_at + r.bake_s:
            return
        why = self._health_check(conn, r, now, force=True)
        if why is not None:
            self._abort(conn, r, now, *why, report=report)
            return
        if stage + 1 >= len(r.stages):
            records.update_rollout(conn, r.id, state="completed", finished_at=now, updated_at=now)
            report.events.append(f"rollout {r.id}: completed")
            log.info("rollout %d: completed (%s on %d devices)", r.id, r.model, r.device_count)
            return
        records.update_rollout(
            conn,
            r.id,
            current_stage=stage + 1,
            stage_started_at=None,
            stage_done_at=None,
            updated_at=now,
        )
        self._assign(conn, dataclasses.replace(r, current_stage=stage + 1), stage + 1, now, report)

    def _refresh(self, conn: Connection, r: RolloutInfo, now: float, report: TickReport) -> None:
        """Re-derive the watched executions: every one every ``SUCCEEDED_EVERY_S`` and before
        a stage may end, else those in flight whose reports or rows changed since this
        process last derived them, or whose timeout came (``controller.rollouts.watch``)."""
        changes = []
        broken: list[tuple[str, str, DeviceFault]] = []
        watched = self._versions.read(conn, r, now, broken)
        report.rederived += len(watched)
        for e in watched:
            status, phase, reason = next_status(e, r.model, now=now, timeout_s=r.timeout_s)
            evidence = e.evidence_for(r.model)
            if (status, phase, reason, evidence) == (e.status, e.phase, e.reason, e.evidence):
                self._versions.derived(r.id, e, None)
                continue
            finished = e.finished_at
            if status in FINISHED and (status != e.status or finished is None):
                finished = now
            elif status not in FINISHED:
                finished = None
            changes.append(
                {
                    "device_id": e.device_id,
                    "stream": e.stream,
                    "status": status,
                    "phase": phase,
                    "reason": reason,
                    "evidence": evidence,
                    "finished_at": finished,
                    "now": now,
                }
            )
            self._versions.derived(r.id, e, changes[-1])
            if status != e.status and status in FAILURES:
                log.warning(
                    "rollout %d: %s/%s %s (%s)", r.id, e.device_id, e.stream, status, reason
                )
        executions.update_executions(conn, r.id, changes)
        self._fail(conn, r, [(d, s, f.reason) for d, s, f in broken], now)

    def _fail(
        self, conn: Connection, r: RolloutInfo, failed: list[tuple[str, str, str]], now: float
    ) -> None:
        """Fail executions for a per-device fault (``controller.rollouts.faults``)."""
        for device_id, stream, reason in failed:
            log.warning("rollout %d: %s/%s failed (%s)", r.id, device_id, stream, reason)
        executions.mark_failed(
            conn,
            r.id,
            [{"device_id": d, "stream": s, "reason": why, "now": now} for d, s, why in failed],
        )

    def _assign(
        self, conn: Connection, r: RolloutInfo, stage: int, now: float, report: TickReport
    ) -> None:
        base = self.base_url()
        if base is None:
            log.debug("rollout %d: the API URL is not known yet; stage %d waits", r.id, stage + 1)
            return
        m = get_model_by_id(conn, r.model_id)
        if m is None:  # the registry row is referenced by a foreign key: cannot happen
            raise RuntimeError(f"rollout {r.id}: model id {r.model_id} vanished from the registry")
        ref = model_ref(m, base, r.gate)
        pairs = executions.pending_of_stage(conn, r.id, stage)
        desired, faults = read_desired(conn, (d for d, _ in pairs))
        reports = executions.stream_reports(conn, (d for d, _ in pairs))
        changes: dict[str, dict[str, dict[str, Any] | None]] = defaultdict(dict)
        rows: list[dict[str, Any]] = []
        for device_id, stream in pairs:
            if device_id in faults:
                continue
            current = desired.get(device_id)
            previous = current.models.get(stream) if current is not None else None
            changes[device_id][stream] = ref
            before = reports.get((device_id, stream))
            stale = (
                before
                if before is not None
                and before["phase"] in FAILED_PHASES
                and before["target"] == r.model
                else None
            )
            rows.append(
                {
                    "device_id": device_id,
                    "stream": stream,
                    "previous_model": ref_name(previous),
                    "previous_ref": previous,
                    "stale_outcome": stale,
                    "now": now,
                }
            )
        written = write_desired(conn, changes, rollout_id=r.id, now=now)
        faults.update(written.faults)
        revs = written.revs
        rows = [row for row in rows if row["device_id"] in revs]
        for row in rows:
            row["rev"] = revs[row["device_id"]]
        executions.mark_assigned(conn, r.id, rows)
        self._fail(conn, r, [(d, s, faults[d].reason) for d, s in pairs if d in faults], now)
        records.update_rollout(conn, r.id, stage_started_at=now, updated_at=now)
        report.assigned += len(rows)
        report.desired_written += len(revs)
        report.events.append(
            f"rollout {r.id}: stage {stage + 1} assigned to {len(revs)} devices"
            + (f" ({len(faults)} failed: {', '.join(sorted(faults))[:200]})" if faults else "")
        )
        log.info(
            "rollout %d: stage %d/%d: %s desired on %d devices (%d executions)",
            r.id,
            stage + 1,
            len(r.stages),
            r.model,
            len(revs),
            len(rows),
        )

    def _abort(
        self,
        conn: Connection,
        r: RolloutInfo,
        now: float,
        reason: str,
        detail: str,
        *,
        report: TickReport,
    ) -> None:
        failed = executions.list_rollout_devices(conn, r.id, statuses=tuple(FAILURES))
        if failed and reason != "health_regression":
            shown = ", ".join(
                f"{f.device_id}/{f.stream}: {f.reason or f.status}" for f in failed[:5]
            )
            detail += f" ({shown}{', …' if len(failed) > 5 else ''})"
        records.update_rollout(
            conn,
            r.id,
            state="aborted",
            reason=reason,
            detail=detail,
            finished_at=now,
            updated_at=now,
        )
        report.events.append(f"rollout {r.id}: aborted ({reason})")
        log.warning("rollout %d aborted (%s): %s; rolling back", r.id, reason, detail)
        self._roll_back(conn, dataclasses.replace(r, state="aborted"), now, report)

    def _roll_back(self, conn: Connection, r: RolloutInfo, now: float, report: TickReport) -> None:
        """Give every execution the rollout touched its pre-rollout model back (absent = baseline)."""
        todo = executions.to_roll_back(conn, r.id)
        devices = [d for d, _, _ in todo]
        desired, faults = read_desired(conn, devices)
        others = executions.live_pairs(conn, devices, exclude=r.id)
        changes: dict[str, dict[str, dict[str, Any] | None]] = defaultdict(dict)
        skipped = []
        for device_id, stream, previous in todo:
            row = desired.get(device_id)
            current = ref_name(row.models.get(stream)) if row is not None else None
            if device_id in faults or current != r.model or (device_id, stream) in others:
                holder = others.get((device_id, stream))
                why = (
                    faults[device_id].reason
                    if device_id in faults
                    else f"rollout {holder} holds it now"
                    if holder
                    else f"its desired model is now {current or 'the baseline'}"
                )
                skipped.append(
                    {
                        "device_id": device_id,
                        "stream": stream,
                        "reason": f"not rolled back: {why}",
                        "now": now,
                    }
                )
                continue
            changes[device_id][stream] = previous
        written = write_desired(conn, changes, rollout_id=r.id, now=now)
        revs = written.revs
        for device_id, fault in written.faults.items():
            skipped += [
                {
                    "device_id": device_id,
                    "stream": s,
                    "reason": f"not rolled back: {fault.reason}",
                    "now": now,
                }
                for s in changes.pop(device_id)
            ]
        marks = [
            {
                "device_id": d,
                "stream": s,
                "status": "rolled_back",
                "rev": revs[d],
                "reason": None,
                "now": now,
            }
            for d, streams in changes.items()
            for s in streams
        ]
        executions.mark_rolled_back(conn, r.id, marks)
        executions.note_executions(conn, r.id, skipped)
        records.update_rollout(conn, r.id, rolled_back_at=now, updated_at=now)
        report.rolled_back += len(marks)
        report.desired_written += len(revs)
        report.events.append(f"rollout {r.id}: rolled back {len(marks)} executions")
        log.info(
            "rollout %d: pre-rollout models written back to %d devices (%d executions, %d skipped)",
            r.id,
            len(revs),
            len(marks),
            len(skipped),
        )

    def _health_check(
        self, conn: Connection, r: RolloutInfo, now: float, *, force: bool
    ) -> tuple[str, str] | None:
        """Updated devices' before/after change against that of the devices not yet updated
        over the same time (``controller.rollouts.health``); none left to compare: no check."""
        policy = self.health
        last = self._health_at.get(r.id)
        if not force and last is not None and now - last < policy.every_s:
            return None
        self._health_at[r.id] = now
        updated, pending = executions.succeeded_and_pending(conn, r.id, policy.max_devices)
        updated = updated[: policy.max_devices]
        if not updated or not pending:
            return None
        canary = [
            (d, s, change_windows(policy, assigned_at=a, done_at=f, now=now))
            for d, s, a, f in updated
        ]
        control = control_windows(policy, [(a, f) for _, _, a, f in updated], now=now)
        samples: dict[str, list[tuple[float, list[dict[str, Any]]]]] = defaultdict(list)
        wanted = [(d, w) for d, _, w in canary] + [(d, control) for d, _ in pending]
        for ids, since, until in telemetry_queries(wanted):
            for d, rows in executions.recent_telemetry(conn, ids, since=since, until=until).items():
                samples[d].extend(rows)
        n = policy.min_samples
        verdict = judge(
            policy,
            [c for d, s, w in canary if (c := device_change(samples[d], s, w, min_samples=n))],
            [c for d, s in pending if (c := device_change(samples[d], s, control, min_samples=n))],
        )
        if verdict.outcome != "regression":
            log.debug("rollout %d: health %s: %s", r.id, verdict.outcome, verdict.detail)
            return None
        return "health_regression", verdict.detail
