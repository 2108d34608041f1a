"""A fleet written straight into the database for rollout engine tests: devices with tags and
streams, the reported states devices send, registry models, and a fake clock.

``act`` plays what agents do with their desired state (docs/ota.md): a device whose
desired ``rev`` is above the one it reported takes it up and reports every stream
``committed`` on the desired model (absent = its baseline), or ``failed`` for the models
``fail`` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controller.db.session import Database
from controller.fleet.devices import set_tags
from controller.fleet.registry import ModelInfo, add_model
from controller.fleet.writes import Received, write_messages
from controller.rollouts import commands
from controller.rollouts.desired import DesiredRow, get_desired
from controller.rollouts.engine import RolloutEngine, TickReport
from controller.rollouts.executions import list_rollout_devices
from controller.rollouts.health import HealthPolicy
from controller.rollouts.records import RolloutDeviceInfo, RolloutInfo, get_rollout
from protocol import Reported, Status, StreamReport, StreamStatus, StreamTelemetry, Telemetry
from tests.controller.conftest import Clock

BASE_URL = "http://ctl.example:8080"
BASELINE = "base@1"


class Fleet:
    def __init__(self, db: Database, clock: Clock, *, health: HealthPolicy | None = None) -> None:
        self.db = db
        self.clock = clock
        self.engine = RolloutEngine(db, base_url=lambda: BASE_URL, clock=clock, health=health)
        self.streams: dict[str, tuple[str, ...]] = {}
        self.active: dict[tuple[str, str], str] = {}
        self.handled: dict[str, int | None] = {}
        self.frames: dict[tuple[str, str], int] = {}
        self.working: set[str] = set()
        """Devices that took up their desired rev (``take_up``) and have not finished it."""

    # --- devices ----------------------------------------------------------------------

    def add(
        self,
        *ids: str,
        streams: Sequence[str] = ("cam0",),
        tags: Sequence[str] = (),
        reported_rev: int | None = None,
    ) -> None:
        now = self.clock()
        items = []
        for d in ids:
            self.streams[d] = tuple(streams)
            self.handled[d] = reported_rev
            for s in streams:
                self.active[(d, s)] = BASELINE
            status = Status(
                schema=1,
                device_id=d,
                state="online",
                ts=now,
                agent_version="1.0",
                started_at=now,
                streams=[
                    StreamStatus(name=s, source_state="running", model=BASELINE) for s in streams
                ],
            )
            items.append(Received(topic="t", device_id=d, message=status, received_at=now))
        with self.db.begin() as conn:
            write_messages(conn, items)
            for d in ids:
                if tags:
                    set_tags(conn, d, add=tags)
        for d in ids:
            self.publish_report(d)

    def publish_report(
        self,
        device_id: str,
        phases: Mapping[str, tuple[str, str | None, str | None]] | None = None,
    ) -> None:
        """Write the device's reported state; ``phases``: stream → (phase, target, reason)."""
        now = self.clock()
        streams = {}
        for s in self.streams[device_id]:
            phase, target, reason = (phases or {}).get(s, ("idle", None, None))
            streams[s] = StreamReport(
                active=self.active[(device_id, s)],
                phase=phase,  # type: ignore[arg-type]
                target=target,
                reason=reason,
            )
        rep = Reported(
            schema=1,
            device_id=device_id,
            ts=now,
            desired_rev=self.handled[device_id],
            streams=streams,
        )
        with self.db.begin() as conn:
            write_messages(
                conn, [Received(topic="t", device_id=device_id, message=rep, received_at=now)]
            )

    def take_up(self, device_id: str, phase: str = "downloading") -> None:
        """The device took up its desired rev and is working on it."""
        desired = self.desired(device_id)
        assert desired is not None
        self.handled[device_id] = desired.rev
        self.working.add(device_id)
        self.publish_report(
            device_id,
            {
                s: (phase, _ref(desired.models.get(s)) or BASELINE, None)
                for s in self.streams[device_id]
            },
        )

    def act(
        self, fail: Mapping[str, str] | None = None, devices: Iterable[str] | None = None
    ) -> list[str]:
        """Devices with a new desired rev deploy it; returns the ones that acted."""
        acted = []
        for d in devices or list(self.streams):
            desired = self.desired(d)
            if desired is None or ((self.handled[d] or 0) >= desired.rev and d not in self.working):
                continue
            self.working.discard(d)
            self.handled[d] = desired.rev
            phases: dict[str, tuple[str, str | None, str | None]] = {}
            for s in self.streams[d]:
                target = _ref(desired.models.get(s)) or BASELINE
                if target == self.active[(d, s)]:
                    phases[s] = ("committed", target, None)
                elif fail and target in fail:
                    phases[s] = ("failed", target, fail[target])
                else:
                    self.active[(d, s)] = target
                    phases[s] = ("committed", target, None)
            self.publish_report(d, phases)
            acted.append(d)
        return acted

    def telemetry(
        self,
        device_id: str,
        *,
        infer_ms_p95: float = 3.0,
        fps: float = 25.0,
        errors: int = 0,
        frames: int = 250,
    ) -> None:
        now = self.clock()
        streams = []
        for s in self.streams[device_id]:
            total = self.frames.get((device_id, s), 0) + frames
            self.frames[(device_id, s)] = total
            streams.append(
                StreamTelemetry(
                    name=s,
                    source_state="running",
                    fps=fps,
                    frames_captured=total,
                    frames_processed=total,
                    frames_dropped=0,
                    infer_ms_p50=infer_ms_p95 / 2,
                    infer_ms_p95=infer_ms_p95,
                    latency_ms_p50=10.0,
                    latency_ms_p95=20.0,
                    errors=errors,
                )
            )
        msg = Telemetry(
            schema=1,
            device_id=device_id,
            ts=now,
            interval_s=10.0,
            cpu_percent=10,
            mem_percent=10,
            mem_used_bytes=1,
            temp_c=None,
            disk_percent=10,
            disk_free_bytes=1,
            spool_depth=0,
            spool_dropped=0,
            streams=streams,
        )
        with self.db.begin() as conn:
            write_messages(
                conn, [Received(topic="t", device_id=device_id, message=msg, received_at=now)]
            )

    # --- registry and rollouts -----------------------------------------------------------

    def model(self, name: str = "m", version: str = "2") -> ModelInfo:
        with self.db.begin() as conn:
            return add_model(
                conn,
                name=name,
                version=version,
                sha256=(name + version).encode().hex().ljust(64, "0")[:64],
                size=1234,
                runtime="litert",
                manifest={},
                signature="c2ln",
                key_id=None,
                now=self.clock(),
            )

    def create(
        self, model: str = "m@2", select: Sequence[str] = ("all",), **kw: Any
    ) -> RolloutInfo:
        req = commands.RolloutRequest(model=model, select=select, **kw)
        with self.db.begin() as conn:
            return commands.create_rollout(conn, req, now=self.clock(), created_by="test")

    def tick(self, advance: float = 0.0) -> TickReport:
        self.clock.advance(advance)
        report = self.engine.tick()
        assert report.errors == 0
        return report

    def rollout(self, rollout_id: int) -> RolloutInfo:
        with self.db.connect() as conn:
            r = get_rollout(conn, rollout_id)
        assert r is not None
        return r

    def rows(self, rollout_id: int) -> dict[tuple[str, str], RolloutDeviceInfo]:
        with self.db.connect() as conn:
            return {(r.device_id, r.stream): r for r in list_rollout_devices(conn, rollout_id)}

    def statuses(self, rollout_id: int) -> dict[str, str]:
        return {f"{d}/{s}": r.status for (d, s), r in self.rows(rollout_id).items()}

    def desired(self, device_id: str) -> DesiredRow | None:
        with self.db.connect() as conn:
            return get_desired(conn, [device_id]).get(device_id)

    def desired_model(self, device_id: str, stream: str = "cam0") -> str | None:
        row = self.desired(device_id)
        return None if row is None else _ref(row.models.get(stream))

    def run(
        self,
        rollout_id: int,
        *,
        fail: Mapping[str, str] | None = None,
        step: float = 1.0,
        limit: int = 500,
    ) -> RolloutInfo:
        """Tick and let devices act until the rollout ended (and its rollback is written)."""
        for _ in range(limit):
            self.tick(step)
            self.act(fail)
            r = self.rollout(rollout_id)
            if not r.live and (r.state == "completed" or r.rolled_back_at is not None):
                return r
        raise AssertionError(f"rollout {rollout_id} did not end: {self.rollout(rollout_id)}")


def _ref(ref: Mapping[str, Any] | None) -> str | None:
    return None if not ref else f"{ref['name']}@{ref['version']}"
