"""Persisted OTA state: one file per stream and the last desired state the agent took up.

``{ota_dir}/{stream}.json`` holds the stream's deployment (phase, target, reason, …) and is
rewritten before each step runs (docs/ota.md); ``{ota_dir}/_desired.json`` holds the last
handled ``Desired`` message (``_`` cannot start a stream name, so the names never collide).
Both are schema-versioned and written with temp file + fsync + rename.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import msgspec

from agent.atomic import StateFileError, atomic_write_json, read_json_state
from protocol import Desired, GateEvidence, ModelRef, ProtocolError, decode, encode
from protocol.messages import DEPLOYING_PHASES, OUTCOME_PHASES, DeploymentPhase

__all__ = [
    "IN_PROGRESS",
    "OUTCOMES",
    "StreamState",
    "load_desired",
    "load_stream_state",
    "same_model",
    "save_desired",
    "save_stream_state",
]

STATE_SCHEMA = 1
DESIRED_FILE = "_desired.json"
IN_PROGRESS: frozenset[str] = DEPLOYING_PHASES
OUTCOMES: frozenset[str] = OUTCOME_PHASES
_PHASES = frozenset(get_args(DeploymentPhase))


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream's deployment, as persisted."""

    phase: DeploymentPhase = "idle"
    target: ModelRef | None = None
    """The model being or last deployed; None with ``baseline`` (or never deployed)."""
    baseline: bool = False
    """The target is the stream's baseline (the config's model)."""
    target_ref: str | None = None
    """``name@version`` of the target (also for the baseline)."""
    rev: int | None = None
    rollout_id: str | None = None
    reason: str | None = None
    message: str | None = None
    from_slot: str | None = None
    """Store slot that was current before ``switching`` (None = the baseline): what a restart
    in switching/probation goes back to."""
    updated_at: float = 0.0
    gate: GateEvidence | None = None
    """The health gate's evidence for the target (kept with the outcome)."""

    def evolve(self, **changes: Any) -> StreamState:
        return replace(self, **changes)


def same_model(a: ModelRef | None, b: ModelRef | None) -> bool:
    """Same bundle: same name, version and sha256 (the URL may change)."""
    if a is None or b is None:
        return a is b
    return (a.name, a.version, a.sha256.lower()) == (b.name, b.version, b.sha256.lower())


def _fix(path: Path) -> str:
    return (
        f"delete {path}: the agent then starts on its installed model and the controller's "
        "retained desired state is taken up again"
    )


def stream_state_path(ota_dir: Path, stream: str) -> Path:
    return Path(ota_dir) / f"{stream}.json"


def load_stream_state(ota_dir: Path, stream: str) -> StreamState:
    path = stream_state_path(ota_dir, stream)
    raw = read_json_state(path, schema=STATE_SCHEMA, what="OTA stream state", fix=_fix(path))
    if raw is None:
        return StreamState()
    try:
        phase = raw["phase"]
        if phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        target = raw.get("target")
        return StreamState(
            phase=phase,
            target=msgspec.convert(target, ModelRef) if target is not None else None,
            baseline=bool(raw.get("baseline", False)),
            target_ref=_opt_str(raw.get("target_ref")),
            rev=_opt_int(raw.get("rev")),
            rollout_id=_opt_str(raw.get("rollout_id")),
            reason=_opt_str(raw.get("reason")),
            message=_opt_str(raw.get("message")),
            from_slot=_opt_str(raw.get("from_slot")),
            updated_at=float(raw.get("updated_at", 0.0)),
            gate=msgspec.convert(raw["gate"], GateEvidence) if raw.get("gate") else None,
        )
    except (KeyError, TypeError, ValueError, msgspec.ValidationError) as err:
        raise StateFileError(f"OTA stream state {path} is corrupt ({err}); {_fix(path)}") from err


def save_stream_state(ota_dir: Path, stream: str, state: StreamState) -> None:
    Path(ota_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        stream_state_path(ota_dir, stream),
        schema=STATE_SCHEMA,
        data={
            "phase": state.phase,
            "target": msgspec.to_builtins(state.target) if state.target is not None else None,
            "baseline": state.baseline,
            "target_ref": state.target_ref,
            "rev": state.rev,
            "rollout_id": state.rollout_id,
            "reason": state.reason,
            "message": state.message,
            "from_slot": state.from_slot,
            "updated_at": state.updated_at,
            "gate": msgspec.to_builtins(state.gate) if state.gate is not None else None,
        },
    )


def load_desired(ota_dir: Path) -> Desired | None:
    """The last desired state the agent took up, or None."""
    path = Path(ota_dir) / DESIRED_FILE
    raw = read_json_state(path, schema=STATE_SCHEMA, what="OTA desired state", fix=_fix(path))
    if raw is None:
        return None
    try:
        return decode(msgspec.json.encode(raw.get("desired")), Desired)
    except ProtocolError as err:
        raise StateFileError(f"OTA desired state {path} is corrupt ({err}); {_fix(path)}") from err


def save_desired(ota_dir: Path, desired: Desired) -> None:
    Path(ota_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        Path(ota_dir) / DESIRED_FILE,
        schema=STATE_SCHEMA,
        data={"desired": msgspec.json.decode(encode(desired))},
    )


def _opt_str(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
