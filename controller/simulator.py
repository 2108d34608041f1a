"""A protocol-level device simulator: real protocol messages over real MQTT, no camera or model.

Each ``SimulatedDevice`` has its own MQTT v5 connection with the agent's contract: a
retained ``online`` status with an ``offline`` status as last will, a retained reported
state, telemetry every ``telemetry_interval_s``, events on demand. Killing the process
(SIGKILL) makes the broker publish the will, like a device losing power.

With ``ota=OtaBehaviour(...)`` a device also acts on its retained ``desired`` state as
docs/ota.md describes: a ``rev`` above the last one it handled is taken up, and each
stream whose model changes walks downloading → verifying → staging → shadow → switching
→ probation → committed (reported after each phase, with health-gate evidence from
``shadow`` on; a replacement, ``gate.compare`` false, skips ``shadow``), or fails with a
reason on demand (``fail``; in ``shadow``/``probation`` with failing evidence); a stream
absent from ``models`` goes back to its baseline. With
``download`` it really fetches the bundle and checks its size and sha256. Models in
``slow`` make its telemetry clearly worse (the controller's health comparison); ``load``
scales every device's inference latency over time, updated or not (a fleet-wide spike).
``SimulatedFleet`` runs many such devices over a few shared connections (benchmarks).

``publish_load`` pushes pre-encoded telemetry of many device ids through a few
connections as fast as possible (or at a rate) for load tests and benchmarks.

Command line::

    python -m controller.simulator --broker mqtt://127.0.0.1:1883 --devices 3 --prefix sim
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args
from urllib.parse import urlsplit

from controller.simulator_gate import GATE_STAGES
from controller.simulator_gate import evidence as gate_evidence
from protocol import (
    Desired,
    Event,
    ModelRef,
    ProtocolError,
    Reported,
    Status,
    StreamReport,
    StreamStatus,
    StreamTelemetry,
    Telemetry,
    decode,
    desired_topic,
    encode,
    events_topic,
    parse_topic,
    reported_topic,
    status_topic,
    telemetry_topic,
)
from protocol.messages import DEPLOYING_PHASES, DeploymentPhase

log = logging.getLogger(__name__)

AGENT_VERSION = "sim-0.1.0"
DEFAULT_MODEL = "blazeface-short-int8@1"


def status_message(
    device_id: str,
    *,
    state: str,
    ts: float,
    started_at: float,
    streams: Sequence[str] = ("cam0",),
    model: str | None = DEFAULT_MODEL,
    agent_version: str = AGENT_VERSION,
) -> Status:
    return Status(
        schema=1,
        device_id=device_id,
        state=state,  # type: ignore[arg-type]
        ts=ts,
        agent_version=agent_version,
        started_at=started_at,
        streams=[
            StreamStatus(
                name=s,
                source_state="running" if state == "online" else "stopped",
                model=model,
            )
            for s in streams
        ],
    )


def reported_message(
    device_id: str,
    *,
    ts: float,
    streams: Sequence[str] = ("cam0",),
    model: str | None = DEFAULT_MODEL,
    previous: str | None = None,
    desired_rev: int | None = None,
) -> Reported:
    return Reported(
        schema=1,
        device_id=device_id,
        ts=ts,
        desired_rev=desired_rev,
        streams={
            s: StreamReport(
                active=model,
                previous=previous,
                installed=[m for m in (model, previous) if m],
                phase="idle",
            )
            for s in streams
        },
    )


def telemetry_message(
    device_id: str,
    *,
    ts: float,
    rng: random.Random,
    streams: Sequence[str] = ("cam0",),
    interval_s: float = 10.0,
) -> Telemetry:
    return Telemetry(
        schema=1,
        device_id=device_id,
        ts=ts,
        interval_s=interval_s,
        cpu_percent=round(rng.uniform(5, 90), 1),
        mem_percent=round(rng.uniform(20, 70), 1),
        mem_used_bytes=rng.randrange(200, 900) * 1024 * 1024,
        temp_c=round(rng.uniform(40, 75), 1),
        disk_percent=round(rng.uniform(10, 60), 1),
        disk_free_bytes=rng.randrange(1, 30) * 1024**3,
        spool_depth=0,
        spool_dropped=0,
        streams=[
            StreamTelemetry(
                name=s,
                source_state="running",
                fps=round(rng.uniform(10, 30), 2),
                frames_captured=rng.randrange(100, 1000),
                frames_processed=rng.randrange(100, 1000),
                frames_dropped=rng.randrange(0, 20),
                infer_ms_p50=round(rng.uniform(0.5, 2), 3),
                infer_ms_p95=round(rng.uniform(2, 5), 3),
                latency_ms_p50=round(rng.uniform(5, 20), 3),
                latency_ms_p95=round(rng.uniform(20, 60), 3),
            )
            for s in streams
        ],
    )


def event_message(
    device_id: str, *, ts: float, code: str, level: str = "info", message: str = ""
) -> Event:
    return Event(
        schema=1,
        device_id=device_id,
        ts=ts,
        code=code,
        level=level,  # type: ignore[arg-type]
        message=message or code,
    )


def _client(client_id: str, username: str | None, password: str | None) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    return client


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


# --- OTA behaviour ------------------------------------------------------------------------

DEPLOY_PHASES: tuple[str, ...] = (
    *(p for p in get_args(DeploymentPhase) if p in DEPLOYING_PHASES),
    "committed",
)
"""The phases a deployment passes through, in order (the protocol's), ending committed."""


@dataclass(frozen=True)
class OtaBehaviour:
    """How simulated devices handle desired states."""

    fail: dict[str, str] = field(default_factory=dict)
    """Model (``name@version``) → failure reason, e.g. ``{"m@2": "golden_mismatch"}``."""
    fail_phase: str = "staging"
    """Where a failing model fails; ``probation`` reports ``rolled_back`` instead of ``failed``."""
    fail_devices: frozenset[str] | None = None
    """Only these devices fail (None: every device)."""
    slow: frozenset[str] = frozenset()
    """Models with clearly worse telemetry: 3x inference p95, half the fps."""
    load: Callable[[float], float] | None = None
    """Machine-wide load: telemetry ``ts`` → factor on every device's inference p95, updated
    or not (a CPU spike that hits the whole fleet at one moment); None: 1."""
    phase_delay_s: float = 0.05
    download: bool = False
    """Fetch the bundle over HTTP and check its size and sha256 (``download_failed``,
    ``http_<status>``, ``size_mismatch``, ``sha256_mismatch`` otherwise); connection errors
    and 5xx are retried with backoff for ``download_retry_s``."""
    download_retry_s: float = 20.0

    def failure(self, device_id: str, model: str) -> str | None:
        if model not in self.fail:
            return None
        if self.fail_devices is not None and device_id not in self.fail_devices:
            return None
        return self.fail[model]


def _ref(ref: ModelRef) -> str:
    return f"{ref.name}@{ref.version}"


class _Scheduler:
    """One thread running callbacks at their due time (``time.monotonic``)."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("simulated device step failed")


class DeviceOta:
    """One device's OTA state: what it runs per stream, the desired revs it received and
    handled; ``on_desired`` returns the phase steps to apply (``apply``), one per delay."""

    def __init__(
        self,
        device_id: str,
        *,
        streams: Sequence[str],
        baseline: str | None,
        behaviour: OtaBehaviour,
        seed: int = 0,
    ) -> None:
        self.device_id = device_id
        self.baseline = baseline
        self.behaviour = behaviour
        self.handled_rev: int | None = None
        self.received: list[Desired] = []
        """Every desired message that arrived (retained redeliveries too)."""
        self.deployments: list[tuple[int, str, str]] = []
        """(rev, stream, model) of every deployment started."""
        self.streams: dict[str, dict[str, Any]] = {
            s: {
                "active": baseline,
                "previous": None,
                "installed": [baseline] if baseline else [],
                "phase": "idle",
                "target": None,
                "reason": None,
                "gate": None,
                "compare": True,
            }
            for s in streams
        }
        rng = random.Random(seed)
        self._fps = {s: rng.uniform(24, 26) for s in streams}
        self._infer = {s: rng.uniform(2.8, 3.2) for s in streams}
        self._frames = dict.fromkeys(streams, 0)
        self._rng = rng
        self._refs: dict[tuple[int, str], ModelRef] = {}
        self.lock = threading.Lock()

    def on_desired(self, desired: Desired) -> list[tuple[int, str, str, str | None]]:
        """Steps (rev, stream, phase, reason) for a new rev; none for an old or repeated one."""
        with self.lock:
            self.received.append(desired)
            if self.handled_rev is not None and desired.rev <= self.handled_rev:
                return []
            self.handled_rev = desired.rev
            steps: list[tuple[int, str, str, str | None]] = []
            for stream, st in self.streams.items():
                ref = desired.models.get(stream)
                target = _ref(ref) if ref is not None else self.baseline
                if target is None or (
                    target == st["active"] and st["phase"] not in DEPLOY_PHASES[:-1]
                ):
                    st.update(phase="committed" if target else "idle", target=target, reason=None)
                    continue
                self.deployments.append((desired.rev, stream, target))
                reason = self.behaviour.failure(self.device_id, target) if ref is not None else None
                compare = ref is not None and (ref.gate is None or ref.gate.compare)
                st.update(
                    phase="downloading", target=target, reason=None, gate=None, compare=compare
                )
                if self.behaviour.download and ref is not None:
                    self._refs[(desired.rev, stream)] = ref
                    steps.append((desired.rev, stream, "download", None))
                for phase in DEPLOY_PHASES[1:]:
                    if phase == "shadow" and not compare:  # a replacement: nothing to compare
                        continue
                    if reason is not None and phase == self.behaviour.fail_phase:
                        failed = "rolled_back" if phase == "probation" else "failed"
                        steps.append((desired.rev, stream, failed, reason))
                        break
                    steps.append((desired.rev, stream, phase, None))
            return steps

    def apply(self, step: tuple[int, str, str, str | None]) -> bool:
        """Apply one step; False if a newer rev superseded it (nothing to report)."""
        rev, stream, phase, reason = step
        with self.lock:
            st = self.streams[stream]
            if rev != self.handled_rev or st["phase"] in ("failed", "rolled_back"):
                return False
        if phase == "download":
            ref = self._refs.pop((rev, stream))
            problem = _download(
                ref.url, ref.sha256, ref.size, retry_s=self.behaviour.download_retry_s
            )
            with self.lock:
                if problem is not None and rev == self.handled_rev:
                    st.update(phase="failed", reason=problem)
                return problem is not None
        with self.lock:
            if rev != self.handled_rev:
                return False
            if phase == "committed":
                old = st["active"]
                installed = [m for m in st["installed"] if m not in (st["target"], old)]
                st.update(
                    active=st["target"],
                    previous=old,
                    installed=[st["target"], *([old] if old else []), *installed][:3],
                    phase="committed",
                    reason=None,
                )
            else:
                st.update(phase=phase, reason=reason)
            stage = phase if reason is None else self.behaviour.fail_phase
            if st["compare"] and stage in GATE_STAGES:
                st["gate"] = gate_evidence(stage, self._rng, reason=reason)  # type: ignore[arg-type]
            return True

    def reported(self, ts: float) -> Reported:
        with self.lock:
            return Reported(
                schema=1,
                device_id=self.device_id,
                ts=ts,
                desired_rev=self.handled_rev,
                streams={
                    s: StreamReport(
                        active=st["active"],
                        previous=st["previous"],
                        installed=list(st["installed"]),
                        phase=st["phase"],
                        target=st["target"],
                        reason=st["reason"],
                        gate=st["gate"],
                    )
                    for s, st in self.streams.items()
                },
            )

    def telemetry(self, ts: float, interval_s: float) -> Telemetry:
        with self.lock:
            streams = []
            for s, st in self.streams.items():
                slow = st["active"] in self.behaviour.slow
                fps = self._fps[s] * (0.5 if slow else 1.0) * self._rng.uniform(0.98, 1.02)
                infer = self._infer[s] * (3.0 if slow else 1.0) * self._rng.uniform(0.97, 1.03)
                if self.behaviour.load is not None:
                    infer *= self.behaviour.load(ts)
                self._frames[s] += round(fps * interval_s)
                streams.append(
                    StreamTelemetry(
                        name=s,
                        source_state="running",
                        fps=round(fps, 2),
                        frames_captured=self._frames[s],
                        frames_processed=self._frames[s],
                        frames_dropped=0,
                        infer_ms_p50=round(infer * 0.6, 3),
                        infer_ms_p95=round(infer, 3),
                        latency_ms_p50=round(infer * 0.6 + 8, 3),
                        latency_ms_p95=round(infer + 12, 3),
                    )
                )
        return Telemetry(
            schema=1,
            device_id=self.device_id,
            ts=ts,
            interval_s=interval_s,
            cpu_percent=30.0,
            mem_percent=40.0,
            mem_used_bytes=400 * 1024 * 1024,
            temp_c=50.0,
            disk_percent=30.0,
            disk_free_bytes=10 * 1024**3,
            spool_depth=0,
            spool_dropped=0,
            streams=streams,
        )

    def revs_with(self, model: str) -> set[int]:
        """Distinct desired revs received that carry ``model`` on some stream."""
        with self.lock:
            return {
                d.rev for d in self.received if any(_ref(r) == model for r in d.models.values())
            }


def _download(url: str, sha256: str, size: int, *, retry_s: float = 20.0) -> str | None:
    """Fetch the bundle like an agent would (retrying connection errors and 5xx with backoff
    for ``retry_s``); the failure reason, or None when size and sha256 match."""
    import httpx

    deadline = time.monotonic() + retry_s
    delay = 0.2
    while True:
        h = hashlib.sha256()
        got = 0
        problem: str | None = None
        try:
            with httpx.stream("GET", url, timeout=30) as resp:
                if resp.status_code != 200:
                    problem = f"http_{resp.status_code}"
                else:
                    for chunk in resp.iter_bytes():
                        h.update(chunk)
                        got += len(chunk)
        except httpx.HTTPError:
            problem = "download_failed"
        retryable = problem == "download_failed" or (problem or "").startswith("http_5")
        if retryable and time.monotonic() + delay < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if problem is not None:
            return problem
        if got != size:
            return "size_mismatch"
        return None if h.hexdigest() == sha256 else "sha256_mismatch"


def _decode_desired(device_id: str, payload: bytes) -> Desired | None:
    if not payload:
        return None
    try:
        return decode(payload, Desired)
    except ProtocolError as err:
        log.warning("%s: ignoring a malformed desired state: %s", device_id, err)
        return None


class SimulatedDevice:
    """One simulated device with its own MQTT connection and last will."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        username: str | None = None,
        password: str | None = None,
        streams: Sequence[str] = ("cam0",),
        model: str | None = DEFAULT_MODEL,
        telemetry_interval_s: float = 10.0,
        keepalive_s: int = 10,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        ota: OtaBehaviour | None = None,
    ) -> None:
        """``ota``: act on the desired state (see the module doc); None: ignore it."""
        self.device_id = device_id
        self.broker_url = broker_url
        self.streams = tuple(streams)
        self.model = model
        self.telemetry_interval_s = telemetry_interval_s
        self.keepalive_s = keepalive_s
        self.clock = clock
        self.rng = random.Random(seed)
        self.started_at = clock()
        self.sent = 0
        self._connected = threading.Event()
        self.ota: DeviceOta | None = None
        self._scheduler: _Scheduler | None = None
        if ota is not None:
            self.ota = DeviceOta(
                device_id, streams=self.streams, baseline=model, behaviour=ota, seed=seed or 0
            )
        self._client = _client(f"sim-{device_id}", username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        will = status_message(
            device_id,
            state="offline",
            ts=self.started_at,
            started_at=self.started_at,
            streams=self.streams,
            model=model,
        )
        self._client.will_set(status_topic(device_id), encode(will), qos=1, retain=True)

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            if self.ota is not None:
                client.subscribe(desired_topic(self.device_id), qos=1)
            self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        """A desired state (network thread): schedule its steps, never block here."""
        desired = _decode_desired(self.device_id, msg.payload)
        if desired is None or self.ota is None:
            return
        steps = self.ota.on_desired(desired)
        if not steps:
            return
        if self._scheduler is None:
            self._scheduler = _Scheduler(f"sim-{self.device_id}")
        self._schedule(steps, 0.0)

    def _schedule(self, steps: list[tuple[int, str, str, str | None]], delay: float) -> None:
        assert self.ota is not None
        assert self._scheduler is not None
        ota = self.ota
        self._scheduler.call_later(delay, lambda: self.publish_reported(wait=False))
        phase_delay = ota.behaviour.phase_delay_s
        for i, step in enumerate(steps, start=1):

            def run(step: tuple[int, str, str, str | None] = step) -> None:
                if ota.apply(step):
                    self.publish_reported(wait=False)

            self._scheduler.call_later(delay + i * phase_delay, run)

    def connect(self, timeout: float = 10.0) -> None:
        host, port = _host_port(self.broker_url)
        self._client.connect(host, port, keepalive=self.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self._client.loop_stop()
            raise TimeoutError(f"{self.device_id}: no CONNACK from {self.broker_url}")

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(timeout=10)
        self.sent += 1

    def publish_status(self, state: str = "online") -> None:
        msg = status_message(
            self.device_id,
            state=state,
            ts=self.clock(),
            started_at=self.started_at,
            streams=self.streams,
            model=self.model,
        )
        self._publish(status_topic(self.device_id), encode(msg), retain=True)

    def publish_reported(self, *, desired_rev: int | None = None, wait: bool = True) -> None:
        if self.ota is not None:
            payload = encode(self.ota.reported(self.clock()))
            self._publish(reported_topic(self.device_id), payload, retain=True, wait=wait)
            return
        msg = reported_message(
            self.device_id,
            ts=self.clock(),
            streams=self.streams,
            model=self.model,
            desired_rev=desired_rev,
        )
        self._publish(reported_topic(self.device_id), encode(msg), retain=True)

    def publish_telemetry(self, *, wait: bool = True) -> None:
        if self.ota is not None:
            tele = self.ota.telemetry(self.clock(), self.telemetry_interval_s)
            self._publish(telemetry_topic(self.device_id), encode(tele), wait=wait)
            return
        msg = telemetry_message(
            self.device_id,
            ts=self.clock(),
            rng=self.rng,
            streams=self.streams,
            interval_s=self.telemetry_interval_s,
        )
        self._publish(telemetry_topic(self.device_id), encode(msg), wait=wait)

    def publish_event(self, code: str, *, level: str = "info", message: str = "") -> None:
        msg = event_message(
            self.device_id, ts=self.clock(), code=code, level=level, message=message
        )
        self._publish(events_topic(self.device_id), encode(msg))

    def announce(self) -> None:
        """What an agent does after connecting: online status, reported state, first telemetry."""
        self.publish_status("online")
        self.publish_reported()
        self.publish_telemetry()

    def stop(self, *, graceful: bool = True) -> None:
        """Graceful: publish ``offline`` and disconnect (no will); else just drop the socket."""
        if self._scheduler is not None:
            self._scheduler.stop()
        if graceful and self._connected.is_set():
            self.publish_status("offline")
            self._client.disconnect()
        self._client.loop_stop()


class SimulatedFleet:
    """Many OTA-capable simulated devices over a few shared MQTT connections (no last wills:
    for benchmarks of the controller, not of connection handling)."""

    def __init__(
        self,
        *,
        broker_url: str,
        device_ids: Sequence[str],
        behaviour: OtaBehaviour,
        username: str | None = None,
        password: str | None = None,
        streams: Sequence[str] = ("cam0",),
        model: str | None = DEFAULT_MODEL,
        per_connection: int = 250,
        telemetry_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker_url = broker_url
        self.streams = tuple(streams)
        self.model = model
        self.telemetry_interval_s = telemetry_interval_s
        self.clock = clock
        self.devices = {
            d: DeviceOta(d, streams=streams, baseline=model, behaviour=behaviour, seed=i)
            for i, d in enumerate(device_ids)
        }
        ids = list(device_ids)
        self._groups = [ids[i : i + per_connection] for i in range(0, len(ids), per_connection)]
        self._clients: list[Any] = []
        self._owner: dict[str, Any] = {}
        self._scheduler = _Scheduler("sim-fleet")
        self._subscribed = threading.Semaphore(0)
        for n, group in enumerate(self._groups):
            client = _client(f"sim-fleet-{n}-{time.monotonic_ns() % 10**9}", username, password)
            client.max_inflight_messages_set(1000)
            client.on_message = self._on_message
            client.on_connect = self._connector(group)
            client.on_subscribe = lambda *_: self._subscribed.release()
            self._clients.append(client)
            for d in group:
                self._owner[d] = client

    def _connector(self, group: list[str]) -> Callable[..., None]:
        def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                return
            topics = [(desired_topic(d), 1) for d in group]
            for i in range(0, len(topics), 100):
                client.subscribe(topics[i : i + 100])

        return on_connect

    def connect(self, timeout: float = 30.0) -> None:
        host, port = _host_port(self.broker_url)
        for client in self._clients:
            client.connect(host, port, keepalive=30)
            client.loop_start()
        expected = sum((len(g) + 99) // 100 for g in self._groups)
        deadline = time.monotonic() + timeout
        for _ in range(expected):
            if not self._subscribed.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"simulated fleet: not subscribed within {timeout}s")

    def _publish(self, device_id: str, topic: str, payload: bytes, *, retain: bool) -> Any:
        return self._owner[device_id].publish(topic, payload, qos=1, retain=retain)

    def announce(self) -> None:
        """Online status, reported state and a first telemetry for every device."""
        now = self.clock()
        last: Any = None
        for d, ota in self.devices.items():
            status = status_message(
                d, state="online", ts=now, started_at=now, streams=self.streams, model=self.model
            )
            self._publish(d, status_topic(d), encode(status), retain=True)
            self._publish(d, reported_topic(d), encode(ota.reported(now)), retain=True)
            last = self._publish(
                d,
                telemetry_topic(d),
                encode(ota.telemetry(now, self.telemetry_interval_s)),
                retain=False,
            )
        if last is not None:
            last.wait_for_publish(timeout=60)

    def publish_telemetry(self) -> None:
        now = self.clock()
        for d, ota in self.devices.items():
            self._publish(
                d,
                telemetry_topic(d),
                encode(ota.telemetry(now, self.telemetry_interval_s)),
                retain=False,
            )

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            device_id = parse_topic(msg.topic).device_id
        except ProtocolError:
            return
        ota = self.devices.get(device_id)
        desired = _decode_desired(device_id, msg.payload)
        if ota is None or desired is None:
            return
        steps = ota.on_desired(desired)
        if not steps:
            return
        self._scheduler.call_later(0.0, lambda: self._report(device_id))
        delay = ota.behaviour.phase_delay_s
        for i, step in enumerate(steps, start=1):

            def run(step: tuple[int, str, str, str | None] = step) -> None:
                if ota.apply(step):
                    self._report(device_id)

            self._scheduler.call_later(i * delay, run)

    def _report(self, device_id: str) -> None:
        ota = self.devices[device_id]
        self._publish(
            device_id, reported_topic(device_id), encode(ota.reported(self.clock())), retain=True
        )

    def stop(self) -> None:
        self._scheduler.stop()
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


# --- load generation --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadResult:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def telemetry_payloads(
    device_ids: Sequence[str], *, per_device: int, seed: int = 1, ts0: float | None = None
) -> list[tuple[str, bytes]]:
    """Pre-encoded telemetry, round-robin over the devices (so batches mix devices)."""
    rng = random.Random(seed)
    start = time.time() if ts0 is None else ts0
    templates = {d: telemetry_message(d, ts=start, rng=rng) for d in device_ids}
    out: list[tuple[str, bytes]] = []
    topics = {d: telemetry_topic(d) for d in device_ids}
    import msgspec

    for i in range(per_device):
        for d in device_ids:
            msg = msgspec.structs.replace(templates[d], ts=start + i)
            out.append((topics[d], encode(msg)))
    return out


def publish_load(
    *,
    broker_url: str,
    payloads: Iterable[tuple[str, bytes]],
    username: str | None = None,
    password: str | None = None,
    qos: int = 1,
    rate: float | None = None,
    client_id: str = "sim-load",
) -> LoadResult:
    """Publish ``payloads`` on one connection, at ``rate`` messages/s or as fast as possible.

    The network loop runs on this thread (``loop_write`` between publishes) so the queue
    of unsent messages stays small.
    """
    from paho.mqtt.enums import MQTTErrorCode

    client = _client(client_id, username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(10_000)
    host, port = _host_port(broker_url)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    sent = 0
    t0 = time.monotonic()
    last: Any = None
    try:
        for topic, payload in payloads:
            if rate is not None:
                due = t0 + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            while True:
                last = client.publish(topic, payload, qos=qos)
                if last.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                    break
                time.sleep(0.001)
            sent += 1
        if last is not None and qos > 0:
            last.wait_for_publish(timeout=60)
    finally:
        seconds = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
    return LoadResult(sent=sent, seconds=seconds)


# --- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.simulator",
        description="Simulated edgefleet devices speaking the MQTT protocol (no camera, no model).",
    )
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--devices", type=int, default=1, help="number of devices")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-0001, ...")
    parser.add_argument("--streams", default="cam0", help="comma-separated stream names")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="active model name@version")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--count", type=int, default=0, help="telemetry messages per device, then exit (0 = run)"
    )
    parser.add_argument("--event", action="append", default=[], help="publish this event code")
    parser.add_argument(
        "--ota", action="store_true", help="act on desired states (docs/ota.md): deploy models"
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="MODEL[:REASON]",
        help="deploying MODEL fails (reason default golden_mismatch); implies --ota",
    )
    parser.add_argument(
        "--fail-device", action="append", default=[], help="only this device fails (repeatable)"
    )
    parser.add_argument(
        "--fail-phase", default="staging", choices=DEPLOY_PHASES[:-1], help="where it fails"
    )
    parser.add_argument(
        "--slow", action="append", default=[], metavar="MODEL", help="MODEL has worse telemetry"
    )
    parser.add_argument("--phase-delay", type=float, default=0.05, help="seconds per OTA phase")
    parser.add_argument(
        "--download", action="store_true", help="really download bundles and check them"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    behaviour: OtaBehaviour | None = None
    if args.ota or args.fail or args.slow or args.download:
        fails: dict[str, str] = {}
        for f in args.fail:
            model, _, reason = f.partition(":")
            fails[model] = reason or "golden_mismatch"
        behaviour = OtaBehaviour(
            fail=fails,
            fail_phase=args.fail_phase,
            fail_devices=frozenset(args.fail_device) if args.fail_device else None,
            slow=frozenset(args.slow),
            phase_delay_s=args.phase_delay,
            download=args.download,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    devices = [
        SimulatedDevice(
            device_id=f"{args.prefix}-{i:04d}",
            broker_url=args.broker,
            username=args.username,
            password=args.password,
            streams=[s for s in args.streams.split(",") if s],
            model=args.model,
            telemetry_interval_s=args.telemetry_interval,
            seed=i,
            ota=behaviour,
        )
        for i in range(1, args.devices + 1)
    ]
    for dev in devices:
        dev.connect()
        dev.announce()
        for code in args.event:
            dev.publish_event(code, message=f"simulated {code}")
    print(f"ready: {len(devices)} devices on {args.broker}", flush=True)
    sent = 1
    try:
        while not stop.wait(args.telemetry_interval):
            if args.count and sent >= args.count:
                break
            for dev in devices:
                dev.publish_telemetry(wait=False)
            sent += 1
    finally:
        for dev in devices:
            dev.stop(graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
