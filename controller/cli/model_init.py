"""``edgefleet model init MODEL``: draft a model manifest from a .tflite or .onnx file.

The model is loaded here with the agent's inference core (LiteRT / ONNX Runtime), its inputs
and outputs are printed, the decoder family is recognised from the output shapes and a
manifest draft is written beside the model (``MODEL.json``, or ``--out``). Everything the
draft had to guess is printed as a TODO line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from controller.errors import ControllerError


class ModelInitError(ControllerError):
    """The model cannot be inspected or its draft cannot be written."""


@click.command("init")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Manifest to write [default: MODEL with .json, beside it].",
)
@click.option("--name", help="Model name [default: from the file name].")
@click.option("--version", "version", help="Model version [default: 0.1.0, a placeholder].")
@click.option("--force", is_flag=True, help="Overwrite an existing manifest.")
def model_init(
    model_path: str, out: str | None, name: str | None, version: str | None, force: bool
) -> None:
    """Inspect MODEL (.tflite or .onnx) and write a manifest draft with TODO lines."""
    from inference.errors import BackendUnavailableError, InferenceError
    from inference.inspect import draft_manifest, inspect_model
    from protocol import ProtocolError, decode_manifest

    path = Path(model_path)
    target = Path(out) if out else path.with_suffix(".json")
    if target.resolve() == path.resolve():
        raise ModelInitError(f"--out {target} is the model file itself: choose a .json path")
    if target.exists() and not force:
        raise ModelInitError(
            f"{target} exists: pass --force to overwrite it, or --out PATH to write elsewhere"
        )
    try:
        summary = inspect_model(path)
        draft = draft_manifest(summary, name=name, version=version)
    except BackendUnavailableError as err:
        raise ModelInitError(f"cannot inspect {path}: {err}") from err
    except InferenceError as err:
        raise ModelInitError(str(err)) from err
    text = json.dumps(draft.manifest, indent=2) + "\n"
    try:
        decode_manifest(text)
    except ProtocolError as err:  # e.g. a --name or --version the manifest refuses
        raise ModelInitError(f"the draft is not a valid manifest: {err}") from err
    if target.parent.resolve() != path.parent.resolve():
        draft.todo.append(
            f"the manifest names {path.name} relative to itself: copy {path} next to {target}"
        )
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ModelInitError(f"cannot write {target}: {err}") from err
    for line in summary.lines():
        click.echo(line)
    click.echo(f"decoder: {draft.family}")
    click.echo(f"wrote {target}")
    for line in draft.todo:
        click.echo(f"TODO {line}")
    click.echo(f"check it: edgefleet-agent infer -m {target} IMAGE_OR_VIDEO --jsonl -")
