"""``edgefleet devices list|show|tag``: devices known to the controller (via the HTTP API).

``devices enroll`` and ``devices revoke`` (through the API, or local files) are in
:mod:`controller.cli.security`.
"""

from __future__ import annotations

import re
import time
from typing import Any

import click

from controller.cli.options import json_option
from controller.cli.output import ago, escape, make_console, plural, print_json, uncut_column
from controller.cli.settings import cli_state
from controller.errors import ControllerError
from controller.rollouts.spec import format_duration


@click.group()
def devices() -> None:
    """Devices known to the controller (via the HTTP API)."""


def _models(device: dict[str, Any]) -> str:
    models = sorted({s["active_model"] for s in device["streams"] if s["active_model"]})
    return ", ".join(models) or "-"


@devices.command("list")
@click.option("--tag", "tags", multiple=True, help="Only devices with this tag (repeatable).")
@click.option("--online/--offline", default=None, help="Only online / offline devices.")
@click.option("--model", help="Only devices running this name@version.")
@json_option
@click.pass_context
def devices_list(
    ctx: click.Context, tags: tuple[str, ...], online: bool | None, model: str | None, as_json: bool
) -> None:
    """List devices: state, agent version, active models, tags, last seen."""
    with cli_state(ctx).client() as client:
        found = client.devices(tags=list(tags), online=online, model=model)
    if as_json:
        print_json(found)
        return
    from rich.table import Table

    now = time.time()
    table = Table("DEVICE", "STATE", "AGENT", "MODELS", "TAGS", "LAST SEEN")
    for d in found:
        state = "[green]online[/]" if d["online"] else f"[red]{escape(d['state'] or 'offline')}[/]"
        table.add_row(
            escape(d["id"]),
            state,
            escape(d["agent_version"] or "-"),
            escape(_models(d)),
            escape(", ".join(d["tags"]) or "-"),
            ago(d["last_seen"], now),
        )
    console = make_console()
    console.print(table)
    online_n = sum(1 for d in found if d["online"])
    console.print(f"{plural(len(found), 'device')}, {online_n} online")


def _uptime(device: dict[str, Any], now: float) -> str:
    """Since the agent started (its ``started_at``) until now while the device is online,
    until it was last seen otherwise; ``-`` when it never said when it started."""
    started = device["started_at"]
    if not started:
        return "-"
    until = now if device["online"] else device["last_seen"]
    return format_duration(max(0, round(until - started)))


@devices.command("show")
@click.argument("device_id")
@json_option
@click.pass_context
def devices_show(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """One device: status, streams and models, latest telemetry, recent events."""
    with cli_state(ctx).client() as client:
        device = client.device(device_id)
        latest = client.telemetry(device_id, limit=1)
        recent = client.events(device_id=device_id, limit=5)
    if as_json:
        print_json({"device": device, "telemetry": latest, "events": recent})
        return
    from rich.table import Table

    now = time.time()
    console = make_console()
    state = (
        "[green]online[/]"
        if device["online"]
        else f"[red]{escape(device['state'] or 'offline')}[/]"
    )
    console.print(
        f"[bold]{escape(device['id'])}[/]  {state}  agent {escape(device['agent_version'] or '-')}"
    )
    uptime = _uptime(device, now)
    console.print(
        f"first seen {ago(device['first_seen'], now)}, last seen {ago(device['last_seen'], now)}, "
        f"uptime {uptime}, tags: {escape(', '.join(device['tags']) or '-')}, "
        f"desired rev {device['desired_rev'] if device['desired_rev'] is not None else '-'}"
    )
    if device["streams"]:
        problems = [s["error"] or s["reason"] or "" for s in device["streams"]]
        table = Table(
            "STREAM",
            "SOURCE STATE",
            "ACTIVE MODEL",
            "PREVIOUS",
            "PHASE",
            uncut_column("ERROR", problems),
        )
        for s in device["streams"]:
            table.add_row(
                *(
                    escape(v)
                    for v in (
                        s["name"],
                        s["source_state"] or "-",
                        s["active_model"] or "-",
                        s["previous_model"] or "-",
                        s["phase"] or "-",
                        s["error"] or s["reason"] or "",
                    )
                )
            )
        console.print(table)
    if latest:
        t = latest[-1]
        temp = f"{t['temp_c']:.1f}°C" if t["temp_c"] is not None else "-"
        console.print(
            f"telemetry {ago(t['ts'], now)}: cpu {t['cpu_percent']:.0f}%, "
            f"mem {t['mem_percent']:.0f}%, temp {temp}, disk {t['disk_percent']:.0f}%, "
            f"spool {t['spool_depth']}"
        )
        for s in t["streams"]:
            console.print(
                f"  {escape(s.get('name'))}: {s.get('fps') or 0:.1f} fps, "
                f"latency p95 {s.get('latency_ms_p95') or '-'} ms, dropped {s.get('frames_dropped', '-')}"
            )
    for e in recent:
        console.print(
            f"event {ago(e['ts'], now)} {escape('[' + e['level'] + ']')} {escape(e['code'])}: "
            f"{escape(e['message'])}"
        )


def _check_tag(tag: str) -> None:
    """The API's tag rule (``controller.api.params.TAG_PATTERN``), said in words here
    before the request is sent."""
    from controller.api.params import PATTERN_HINTS, TAG_PATTERN

    if re.fullmatch(TAG_PATTERN, tag):
        return
    fixed = re.sub(r"[^A-Za-z0-9_.:-]+", ":", tag).strip(":_.-")[:64]
    hint = f"; did you mean {fixed}?" if fixed and re.fullmatch(TAG_PATTERN, fixed) else ""
    raise ControllerError(f"invalid tag {tag!r}: {PATTERN_HINTS[TAG_PATTERN]}{hint}")


@devices.command("tag")
@click.argument("device_id")
@click.argument("add", nargs=-1)
@click.option("-r", "--remove", multiple=True, help="Remove this tag (repeatable).")
@json_option
@click.pass_context
def devices_tag(
    ctx: click.Context,
    device_id: str,
    add: tuple[str, ...],
    remove: tuple[str, ...],
    as_json: bool,
) -> None:
    """Add tags (arguments) and remove tags (-r) of a device; prints its tags.

    A tag is 1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit;
    KEY:VALUE by convention (e.g. site:berlin), which ``rollout create --select
    tag=site:berlin`` selects."""
    for tag in add:
        _check_tag(tag)
    with cli_state(ctx).client() as client:
        if add or remove:
            result = client.change_tags(device_id, add=list(add), remove=list(remove))
        else:
            result = client.device(device_id)["tags"]
    if as_json:
        print_json({"device_id": device_id, "tags": result})
        return
    click.echo(f"{device_id}: {', '.join(result) or '(no tags)'}")
