"""``edgefleet rollout ...``: staged OTA rollouts over the HTTP API (docs/ota.md, "Rollouts").

``create`` validates durations, percentages, stages and selectors locally first (the same
parser the API uses), so a typo fails before any request. ``watch`` shows live progress
per stage until the rollout ends (exit code 0 when it completed, 1 when it was aborted or
rolled back).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from controller.cli.options import json_option
from controller.cli.output import ago, escape, make_console, plural, print_json
from controller.cli.rollout_render import (
    gate_line,
    render,
    stage_label,
    stage_list,
    state,
    summary,
)
from controller.client import ControllerClient
from controller.errors import RolloutError
from controller.rollouts import gate, spec

ENDED = ("completed", "aborted", "rolled_back")


def _client(ctx: click.Context) -> ControllerClient:
    state = ctx.find_root().obj
    client: ControllerClient = state.client()
    return client


@click.group()
def rollout() -> None:
    """Staged model rollouts: create, watch, pause, resume, abort, roll back."""


# --- create -------------------------------------------------------------------------------


@rollout.command("create")
@click.argument("ref", metavar="MODEL@VERSION")
@click.option("--stream", default=spec.ALL_STREAMS, show_default=True, help="Stream name or *.")
@click.option(
    "--select",
    "select",
    multiple=True,
    required=True,
    help="all, tag=KEY:VALUE or a device id (repeatable; a device matching any is selected).",
)
@click.option(
    "--stages",
    default=spec.DEFAULT_STAGES,
    show_default=True,
    help="Cumulative stages: N devices or N% of the selection.",
)
@click.option(
    "--bake",
    default=spec.DEFAULT_BAKE,
    show_default=True,
    help="Watch each finished stage this long (30s, 10m, 1h).",
)
@click.option(
    "--max-failures",
    default=spec.DEFAULT_MAX_FAILURES,
    show_default=True,
    help="Abort above this failure share.",
)
@click.option(
    "--min-executed",
    default=spec.DEFAULT_MIN_EXECUTED,
    show_default=True,
    type=int,
    help="Finished executions before the overall share counts.",
)
@click.option(
    "--timeout", default=spec.DEFAULT_TIMEOUT, show_default=True, help="Per-device time limit."
)
@click.option(
    "--min-agreement",
    metavar="FRACTION",
    help="Health gate: least box agreement with the current model (0.9 or 90%).",
)
@click.option(
    "--max-latency-ratio",
    metavar="X",
    help="Health gate: largest median inference time, candidate / current (1.5 or 1.5x).",
)
@click.option(
    "--max-errors", metavar="N", type=int, help="Health gate: candidate inference errors allowed."
)
@click.option(
    "--undecided",
    type=click.Choice(gate.UNDECIDED),
    help="Health gate: what an inconclusive shadow phase ends in.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace, do not compare with the current model (labels differ on purpose); "
    "golden samples, errors and the frame rate still apply.",
)
@json_option
@click.pass_context
def rollout_create(
    ctx: click.Context,
    ref: str,
    stream: str,
    select: tuple[str, ...],
    stages: str,
    bake: str,
    max_failures: str,
    min_executed: int,
    timeout: str,
    min_agreement: str | None,
    max_latency_ratio: str | None,
    max_errors: int | None,
    undecided: str | None,
    replace: bool,
    as_json: bool,
) -> None:
    """Start a staged rollout of MODEL@VERSION (from `edgefleet model list`).

    The health-gate options override the devices' `[ota]` defaults for this rollout only
    (docs/ota.md, "Rollouts")."""
    spec.parse_model_ref(ref)
    spec.parse_stream(stream)
    spec.parse_selector(select)
    spec.parse_stages(stages)
    timeout_s = spec.parse_duration(timeout, what="--timeout")
    if timeout_s <= 0:
        raise RolloutError(f"--timeout {timeout!r} must be above 0")
    if min_executed < 0:
        raise RolloutError(f"--min-executed {min_executed} must be >= 0")
    body = {
        "model": ref,
        "stream": stream,
        "select": list(select),
        "stages": stages,
        "bake_s": spec.parse_duration(bake, what="--bake"),
        "max_failures": spec.parse_share(max_failures, what="--max-failures"),
        "min_executed": min_executed,
        "timeout_s": timeout_s,
    }
    overrides = _gate_body(min_agreement, max_latency_ratio, max_errors, undecided, replace)
    if overrides is not None:
        body["gate"] = overrides
    with _client(ctx) as client:
        created = client.create_rollout(body)
    if as_json:
        print_json(created)
        return
    click.echo(
        f"created rollout {created['id']}: {created['model']} on {created['device_count']} "
        f"devices (stream {created['stream']}), stages {stage_list(created)}, bake "
        f"{spec.format_duration(created['bake_s'])}"
    )
    described = gate_line(created)
    if described:
        click.echo(described)
    click.echo(f"follow it: edgefleet rollout watch {created['id']}")


def _gate_body(
    min_agreement: str | None,
    max_latency_ratio: str | None,
    max_errors: int | None,
    undecided: str | None,
    replace: bool,
) -> dict[str, Any] | None:
    """The API's ``gate`` object of the health-gate options (None: none given)."""
    values: dict[str, Any] = {
        "compare": False if replace else None,
        "min_agreement": None
        if min_agreement is None
        else spec.parse_share(min_agreement, what="--min-agreement"),
        "max_latency_ratio": None
        if max_latency_ratio is None
        else gate.parse_ratio(max_latency_ratio, what="--max-latency-ratio"),
        "max_errors": max_errors,
        "undecided": undecided,
    }
    return gate.normalize(values, gate.cli_label)


# --- list / status ------------------------------------------------------------------------


@rollout.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["active", "paused", "completed", "aborted", "rolled_back"]),
    help="Only rollouts in this state (repeatable).",
)
@click.option("--limit", default=100, show_default=True, type=int)
@json_option
@click.pass_context
def rollout_list(ctx: click.Context, states: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Rollouts, newest first."""
    with _client(ctx) as client:
        found = client.rollouts(states=list(states), limit=limit)
    if as_json:
        print_json(found)
        return
    from rich.table import Column, Table

    now = time.time()
    table = Table(
        "ID",
        Column("MODEL", no_wrap=True),
        "STREAM",
        Column("STATE", no_wrap=True),
        "STAGE",
        "SUCCEEDED",
        "FAILED",
        "CREATED",
        "REASON",
    )
    for r in found:
        table.add_row(
            str(r["id"]),
            escape(r["model"]),
            escape(r["stream"]),
            state(r),
            stage_label(r),
            f"{r['counts'].get('succeeded', 0)}/{r['executions']}",
            str(r["failures"]),
            ago(r["created_at"], now),
            escape(r["reason"] or ""),
        )
    console = make_console()
    console.print(table)
    console.print(plural(len(found), "rollout"))


@rollout.command("status")
@click.argument("rollout_id", type=int)
@click.option("--devices", "all_devices", is_flag=True, help="List every (device, stream).")
@json_option
@click.pass_context
def rollout_status(ctx: click.Context, rollout_id: int, all_devices: bool, as_json: bool) -> None:
    """One rollout: settings, per-stage progress, devices that failed."""
    with _client(ctx) as client:
        r = client.rollout(rollout_id)
    if as_json:
        print_json(r)
        return
    make_console().print(render(r, devices=all_devices))


# --- actions ------------------------------------------------------------------------------


def _action(
    ctx: click.Context, rollout_id: int, action: str, reason: str | None, as_json: bool
) -> None:
    with _client(ctx) as client:
        r = client.rollout_action(rollout_id, action, reason=reason)
    if as_json:
        print_json(r)
        return
    done = {
        "pause": "paused: no further stage starts (`edgefleet rollout resume {id}` continues)",
        "resume": "resumed",
        "abort": "aborted: every device it touched gets its previous model back",
        "rollback": "rolled back: every device it touched gets its previous model back",
    }[action]
    click.echo(f"rollout {r['id']} {done.format(id=r['id'])}")


def _reason_option(func: Any) -> Any:
    return click.option("--reason", help="A note for the record.")(func)


@rollout.command("pause")
@click.argument("rollout_id", type=int)
@json_option
@click.pass_context
def rollout_pause(ctx: click.Context, rollout_id: int, as_json: bool) -> None:
    """Stop starting new stages (devices at work finish; abort criteria still apply)."""
    _action(ctx, rollout_id, "pause", None, as_json)


@rollout.command("resume")
@click.argument("rollout_id", type=int)
@json_option
@click.pass_context
def rollout_resume(ctx: click.Context, rollout_id: int, as_json: bool) -> None:
    """Continue a paused rollout."""
    _action(ctx, rollout_id, "resume", None, as_json)


@rollout.command("abort")
@click.argument("rollout_id", type=int)
@_reason_option
@json_option
@click.pass_context
def rollout_abort(ctx: click.Context, rollout_id: int, reason: str | None, as_json: bool) -> None:
    """End a live rollout and give every device it touched its previous model back."""
    _action(ctx, rollout_id, "abort", reason, as_json)


@rollout.command("rollback")
@click.argument("rollout_id", type=int)
@_reason_option
@json_option
@click.pass_context
def rollout_rollback(
    ctx: click.Context, rollout_id: int, reason: str | None, as_json: bool
) -> None:
    """Undo a live or completed rollout: its devices get their previous models back."""
    _action(ctx, rollout_id, "rollback", reason, as_json)


# --- watch --------------------------------------------------------------------------------


def _ended(r: dict[str, Any]) -> bool:
    return r["state"] == "completed" or (r["state"] in ENDED and r["rolled_back_at"] is not None)


@rollout.command("watch")
@click.argument("rollout_id", type=int)
@click.option(
    "--interval", default=1.0, show_default=True, type=float, help="Seconds between updates."
)
@click.pass_context
def rollout_watch(ctx: click.Context, rollout_id: int, interval: float) -> None:
    """Live progress per stage until the rollout ends (exit 1 if it was aborted or rolled back)."""
    console = make_console()
    with _client(ctx) as client:
        r = client.rollout(rollout_id)
        if console.is_terminal:
            from rich.live import Live

            with Live(render(r, devices=False), console=console, refresh_per_second=4) as live:
                while not _ended(r):
                    time.sleep(interval)
                    r = client.rollout(rollout_id)
                    live.update(render(r, devices=False))
        else:  # a pipe or a log: one line per change
            last = ""
            while True:
                line = summary(r)
                if line != last:
                    click.echo(line)
                    sys.stdout.flush()
                    last = line
                if _ended(r):
                    break
                time.sleep(interval)
                r = client.rollout(rollout_id)
    if r["state"] != "completed":
        raise RolloutError(
            f"rollout {r['id']} {r['state'].replace('_', ' ')} ({r['reason']}): {r['detail']}; "
            "the devices it touched got their previous models back"
        )
    click.echo(
        f"rollout {r['id']} completed: {r['model']} on {r['executions']} executions, {r['failures']} failed"
    )
