"""``edgefleet model quantize``: float TFLite -> INT8 with a size and agreement report.

A command of its own module; the main CLI adds it to its ``model`` group. Local files
only (no API, no database). The work is in :mod:`controller.quantize`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # numpy, LiteRT and the quantizer load only when the command runs
    from controller.quantize import QuantizeReport

DEFAULT_MAX_IMAGES = 200


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _summary(report: QuantizeReport) -> list[str]:
    f, q = report.float_graph, report.int8_graph
    lines = [f"wrote {report.model} and {report.manifest}: {report.ref}"]
    fp16 = f" (fp16 weights; {_kb(report.fp32_size)} as fp32)" if report.fp16_constants else ""
    vs_fp32 = f", {report.size_ratio_fp32:.2f}x fp32" if report.fp16_constants else ""
    lines.append(
        f"size      {report.float_ref} {_kb(f.size)}{fp16} -> INT8 {_kb(q.size)} "
        f"({report.size_ratio:.2f}x the float file{vs_fp32})"
    )
    parts = f"{q.xnnpack_partitions if q.xnnpack_partitions is not None else '?'}"
    lines.append(
        f"graph     {f.ops} -> {q.ops} ops, {report.fused_activations} activations fused, "
        f"{q.standalone_activations} stand-alone left, XNNPACK partitions {parts}; input "
        f"{q.input_dtype} (scale {q.input_scale or 0:.6g}, zero point {q.input_zero_point})"
    )
    if f.invoke_ms is not None and q.invoke_ms is not None:
        lines.append(
            f"invoke    float {f.invoke_ms:.2f} ms, INT8 {q.invoke_ms:.2f} ms "
            "(1 thread, on this machine: the device's figures differ)"
        )
    fixed = ", ".join(f"{x.tensor}={x.min:g}:{x.max:g}" for x in report.fixed_ranges) or "none"
    lo, hi = report.input_range
    lines.append(
        f"calibrate {report.calibration_images} images, input range {lo:g}:{hi:g}, "
        f"fixed ranges: {fixed}"
    )
    agreed, units = report.agreement_counts
    lines.append(
        f"agreement {report.agreement:.0%} ({agreed}/{units}) on {len(report.golden)} golden "
        "images (same label, IoU >= 0.5, score within 0.15):"
    )
    for g in report.golden:
        name = Path(g.image).name
        if not g.float_detections and not g.int8_detections:
            lines.append(f"  {name}: nothing found by either model")
            continue
        found = [
            f"{p.label} IoU {p.iou:.3f} score {p.score_float:.3f} -> {p.score_int8:.3f} "
            f"({p.score_delta:+.3f}){'' if p.agrees else ' DIFFERS'}"
            for p in g.pairs
        ]
        found += [f"{d[0]} {d[1]:.3f} missed by INT8" for d in g.only_float]
        found += [f"{d[0]} {d[1]:.3f} only in INT8" for d in g.only_int8]
        lines.append(f"  {name}: {g.agreed}/{g.units}  " + "; ".join(found))
    return lines


@click.command("quantize")
@click.argument("src", metavar="FLOAT.tflite|MANIFEST.json", type=click.Path(dir_okay=False))
@click.option(
    "--calibration",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of representative images (jpg/png, searched recursively).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: model.tflite + manifest.json.",
)
@click.option("--name", help="Name of the INT8 model [default: float name with -int8].")
@click.option("--version", "version", help="Version [default: the float model's].")
@click.option(
    "--manifest-template",
    type=click.Path(dir_okay=False),
    help="Manifest of a .tflite SRC [default: SRC with .json, or manifest.json beside it].",
)
@click.option(
    "--golden",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Image to compare both models on (repeatable) [default: 4 calibration images].",
)
@click.option(
    "--input-range",
    metavar="MIN:MAX",
    help="Exact float range of the model input [default: from the manifest's mean/std].",
)
@click.option(
    "--fix-range",
    "fix_ranges",
    multiple=True,
    metavar="TENSOR=MIN:MAX",
    help="Set an activation tensor's range instead of calibrating it (repeatable).",
)
@click.option(
    "--max-images",
    type=int,
    default=DEFAULT_MAX_IMAGES,
    show_default=True,
    help="Calibrate on at most this many images (spread over the folder).",
)
@click.option(
    "--min-agreement",
    type=float,
    help="Exit 1 when the golden agreement is below this share (0-1), e.g. 0.9.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def model_quantize(
    src: str,
    calibration: str,
    out_dir: str,
    name: str | None,
    version: str | None,
    manifest_template: str | None,
    golden: tuple[str, ...],
    input_range: str | None,
    fix_ranges: tuple[str, ...],
    max_images: int,
    min_agreement: float | None,
    as_json: bool,
) -> None:
    """Quantize a float TFLite model (fp32 or fp16) to INT8 with a uint8 input.

    Calibrates on the images in --calibration, fuses RELUs so XNNPACK runs the INT8 graph
    in one piece, writes OUT/model.tflite and OUT/manifest.json and compares both models
    on golden images through the agent's offline inference.
    """
    from controller.quantize import QuantizeError, parse_fix_range, parse_range, quantize_model

    src_path = Path(src)
    if not src_path.is_file():
        raise QuantizeError(f"{src} not found: give a float .tflite model or its manifest .json")
    report = quantize_model(
        src_path,
        calibration=Path(calibration),
        out_dir=Path(out_dir),
        name=name,
        version=version,
        golden=[Path(g) for g in golden],
        input_range=parse_range(input_range) if input_range is not None else None,
        fix_ranges=[parse_fix_range(f) for f in fix_ranges],
        manifest_template=Path(manifest_template) if manifest_template else None,
        max_images=max_images,
        min_agreement=min_agreement,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        for line in _summary(report):
            click.echo(line)
    if not report.ok:
        raise QuantizeError(
            f"golden agreement {report.agreement:.0%} is below --min-agreement "
            f"{min_agreement:.0%}: the INT8 model (kept in {out_dir} to inspect) differs from "
            "the float one; calibrate on more representative images or --fix-range the "
            "score head (docs/quantize.md)"
        )
    if not as_json:
        click.echo(
            f"next: edgefleet model package {report.manifest} --name {report.ref.split('@')[0]} "
            f"--version {report.ref.split('@')[1]} --golden IMAGE.png --out MODEL.efb"
        )
