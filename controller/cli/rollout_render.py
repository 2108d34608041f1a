"""How ``edgefleet rollout`` shows a rollout (``list``, ``status``, ``watch``): states,
stages, the devices that failed and the health gate's evidence (docs/ota.md, "Rollouts")."""

from __future__ import annotations

from collections import Counter
from typing import Any

from controller.cli.output import escape, uncut_column
from controller.rollouts import gate, spec
from controller.rollouts.records import FAILURES, counted_status, failures

STATE_STYLE = {
    "active": "cyan",
    "paused": "yellow",
    "completed": "green",
    "aborted": "red",
    "rolled_back": "magenta",
}
SHOWN_DEVICES = 20
"""Problem devices listed without ``--devices``."""


def stage_list(r: dict[str, Any]) -> str:
    return ",".join(str(n) for n in r["stages"])


def state(r: dict[str, Any]) -> str:
    style = STATE_STYLE.get(r["state"], "white")
    return f"[{style}]{r['state']}[/]"


def stage_label(r: dict[str, Any]) -> str:
    if r["state"] == "completed":
        return f"{len(r['stages'])}/{len(r['stages'])}"
    return f"{r['current_stage'] + 1}/{len(r['stages'])}"


def failed_rolled_back(r: dict[str, Any]) -> int:
    """Failed executions (``records.FAILURES``) whose model was given back afterwards; 0
    where the rollout comes without its devices (``rollout list``)."""
    return sum(1 for d in r.get("devices", []) if _failed(d) and d["rollback_rev"] is not None)


def summary(r: dict[str, Any]) -> str:
    """The rollout in one line. Failed counts failed and timed-out executions, rolled back
    afterwards or not (docs/controller.md, "Failed executions"); "rolled back" after it
    counts the executions given their previous model back without having failed."""
    c = r["counts"]
    in_flight = c.get("queued", 0) + c.get("in_progress", 0)
    back = failed_rolled_back(r)
    parts = [
        f"rollout {r['id']} {r['state']}",
        f"stage {stage_label(r)}",
        f"{c.get('succeeded', 0)}/{r['executions']} succeeded",
        f"{r['failures']} failed" + (f" ({back} rolled back)" if back else ""),
    ]
    if in_flight:
        parts.append(f"{in_flight} in progress")
    if c.get("rolled_back"):
        parts.append(f"{c['rolled_back']} {'more ' if back else ''}rolled back")
    return ", ".join(parts)


def gate_line(r: dict[str, Any]) -> str | None:
    """The rollout's health-gate overrides in words, or None without any."""
    described = gate.describe(r.get("gate"))
    return None if described is None else f"gate overrides: {described}"


def evidence_line(d: dict[str, Any], *, with_stream: bool = False) -> str | None:
    """``cam-03 rolled_back probation_agreement: agrees with …`` for a device with evidence
    (``cam-03/door …`` ``with_stream``)."""
    evidence = d.get("evidence")
    if not evidence:
        return None
    who = f"{d['device_id']}/{d['stream']}" if with_stream else d["device_id"]
    reason = f" {d['reason']}" if d["reason"] else ""
    return f"{who} {d['phase'] or d['status']}{reason}: {evidence['summary']}"


def _failed(d: dict[str, Any]) -> bool:
    return counted_status(d["status"], d["reason"]) in FAILURES


def device_status(d: dict[str, Any]) -> str:
    """``failed, rolled back`` for a failed execution whose model was given back."""
    stored = str(d["status"])
    counted = counted_status(stored, d["reason"])
    return f"{counted}, rolled back" if counted != stored else stored


def render(r: dict[str, Any], *, devices: bool) -> Any:
    """A rich renderable of one rollout: header, stage table, problem devices, evidence."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Column, Table
    from rich.text import Text

    header = Text.from_markup(
        f"[bold]rollout {r['id']}[/]  {escape(r['model'])}  stream {escape(r['stream'])}  "
        f"{state(r)}  select {escape(' '.join(r['selector']))}"
    )
    settings = Text(
        f"{r['device_count']} devices, stages {r['stage_spec']} → {stage_list(r)}, bake "
        f"{spec.format_duration(r['bake_s'])}, timeout {spec.format_duration(r['timeout_s'])}, "
        f"max failures {r['max_failures'] * 100:g}% after {r['min_executed']} executed"
    )
    parts: list[Any] = [header, settings]
    overrides = gate_line(r)
    if overrides:
        parts.append(Text(overrides))
    if r["reason"]:
        parts.append(
            Text.from_markup(f"[red]{escape(r['reason'])}[/]: {escape(r['detail'] or '')}")
        )
    elif r["detail"]:
        parts.append(Text(r["detail"]))
    table = Table("STAGE", "DEVICES", "STATE", "PROGRESS", "OK", "FAILED", "WORKING", "BAKE")
    for s in r["stage_progress"]:
        c = s["counts"]
        finished = c.get("succeeded", 0) + failures(c)
        working = c.get("queued", 0) + c.get("in_progress", 0)
        bake = ""
        if s["bake_left_s"] is not None:
            bake = f"{spec.format_duration(round(s['bake_left_s']))} left"
        table.add_row(
            str(s["index"] + 1),
            str(s["devices"]),
            s["state"],
            ProgressBar(
                total=max(s["size"], 1), completed=finished + c.get("rolled_back", 0), width=20
            ),
            str(c.get("succeeded", 0)),
            str(failures(c)),
            str(working),
            bake,
        )
    parts.append(table)
    shown = [d for d in r.get("devices", []) if devices or _failed(d)]
    if shown:
        listed = shown[: None if devices else SHOWN_DEVICES]
        dt = Table(
            "DEVICE",
            "STREAM",
            "STAGE",
            Column("STATUS", no_wrap=True),
            "PHASE",
            "REV",
            "PREVIOUS",
            uncut_column("REASON", (d["reason"] or "" for d in listed)),
        )
        for d in listed:
            dt.add_row(
                escape(d["device_id"]),
                escape(d["stream"]),
                str(d["stage"] + 1),
                device_status(d),
                escape(d["phase"] or "-"),
                str(d["rev"] or "-") + (f"→{d['rollback_rev']}" if d["rollback_rev"] else ""),
                escape(d["previous_model"] or "baseline"),
                escape(d["reason"] or ""),
            )
        parts.append(dt)
        if not devices and len(shown) > SHOWN_DEVICES:
            parts.append(
                Text(f"… {len(shown) - SHOWN_DEVICES} more (--devices shows every device)")
            )
        seen = Counter(d["device_id"] for d in r.get("devices", []))
        lines = [
            line
            for d in listed
            if (line := evidence_line(d, with_stream=seen[d["device_id"]] > 1)) is not None
        ]
        if lines:
            parts.append(Text("health gate evidence:"))
            parts.extend(Text(f"  {line}") for line in lines)
    parts.append(Text(summary(r)))
    return Group(*parts)
