#!/usr/bin/env python3
"""Compare two ``edgefleet-agent infer --jsonl`` outputs of the same video (x86 vs arm64).

    python3 packaging/arm64/compare_infer.py REFERENCE.jsonl OTHER.jsonl [--label CPU]
        [--max-score-diff 0.03] [--max-box-diff 0.02]

They agree when both have the same frames, the same frames hold a detection, each frame has
the same number of detections per label, and paired detections (per frame and label, by
descending score) differ by at most ``--max-score-diff`` in score and ``--max-box-diff`` in
every box coordinate (normalised 0-1). Prints one JSON line with the largest differences
found; exit 0 when they agree, 1 (with the reasons on stderr) when not, 2 on unreadable input.
Standard library only: make test-arm64 runs it with the host's python3.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


class CompareError(Exception):
    """An input file cannot be read as ``infer --jsonl`` output."""


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Result:
    frames: int
    frames_with_detections: tuple[int, ...]
    max_score_diff: float
    max_box_diff: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def read_jsonl(path: Path) -> dict[int, list[Detection]]:
    """Frame number -> detections, from one infer output file."""
    frames: dict[int, list[Detection]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CompareError(f"cannot read {path}: {err.strerror}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            frame = int(row["frame"])
            found = [
                Detection(str(d["label"]), float(d["score"]), _box(d["box"]))
                for d in row["detections"]
            ]
        except (ValueError, KeyError, TypeError) as err:
            raise CompareError(
                f"{path}:{number}: not an `edgefleet-agent infer --jsonl` line ({err})"
            ) from err
        if frame in frames:
            raise CompareError(f"{path}:{number}: frame {frame} appears twice")
        frames[frame] = found
    if not frames:
        raise CompareError(f"{path} holds no frames; did the inference run?")
    return frames


def _box(value: object) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"box {value!r} is not 4 numbers")
    x0, y0, x1, y1 = (float(v) for v in value)
    return (x0, y0, x1, y1)


def compare(
    reference: dict[int, list[Detection]],
    other: dict[int, list[Detection]],
    *,
    max_score_diff: float = 0.03,
    max_box_diff: float = 0.02,
) -> Result:
    problems: list[str] = []
    if set(reference) != set(other):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        problems.append(f"different frames: missing {_span(missing)}, extra {_span(extra)}")
    with_ref = sorted(f for f, d in reference.items() if d)
    with_other = sorted(f for f, d in other.items() if d)
    if with_ref != with_other:
        problems.append(
            f"frames with a detection differ: reference {_span(with_ref)}, "
            f"other {_span(with_other)}"
        )
    worst_score = worst_box = 0.0
    for frame in sorted(set(reference) & set(other)):
        labels = {d.label for d in reference[frame]} | {d.label for d in other[frame]}
        for label in sorted(labels):
            ref = sorted((d for d in reference[frame] if d.label == label), key=_by_score)
            oth = sorted((d for d in other[frame] if d.label == label), key=_by_score)
            if len(ref) != len(oth):
                problems.append(f"frame {frame}: {len(ref)} vs {len(oth)} {label!r} detections")
                continue
            for a, b in zip(ref, oth, strict=True):
                score = abs(a.score - b.score)
                box = max(abs(p - q) for p, q in zip(a.box, b.box, strict=True))
                worst_score, worst_box = max(worst_score, score), max(worst_box, box)
                if score > max_score_diff:
                    problems.append(f"frame {frame}: {label} score differs by {score:.4f}")
                if box > max_box_diff:
                    problems.append(f"frame {frame}: {label} box differs by {box:.4f}")
    return Result(
        frames=len(other),
        frames_with_detections=tuple(with_other),
        max_score_diff=round(worst_score, 4),
        max_box_diff=round(worst_box, 4),
        problems=tuple(problems),
    )


def _by_score(d: Detection) -> float:
    return -d.score


def _span(frames: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2,5-6' (readable frame lists)."""
    if not frames:
        return "none"
    parts: list[str] = []
    start = prev = frames[0]
    for f in [*frames[1:], None]:
        if f is not None and f == prev + 1:
            prev = f
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if f is not None:
            start = prev = f
    return ",".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="infer --jsonl output on x86 (reference)")
    parser.add_argument("other", type=Path, help="infer --jsonl output to check (arm64)")
    parser.add_argument("--label", default="", help="Name shown in the summary (e.g. the CPU).")
    parser.add_argument("--max-score-diff", type=float, default=0.03)
    parser.add_argument("--max-box-diff", type=float, default=0.02)
    args = parser.parse_args(argv)
    try:
        result = compare(
            read_jsonl(args.reference),
            read_jsonl(args.other),
            max_score_diff=args.max_score_diff,
            max_box_diff=args.max_box_diff,
        )
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {
        "label": args.label,
        "ok": result.ok,
        "frames": result.frames,
        "frames_with_detections": _span(list(result.frames_with_detections)),
        "max_score_diff": result.max_score_diff,
        "max_box_diff": result.max_box_diff,
    }
    print(json.dumps(summary))
    for problem in result.problems[:20]:
        print(f"{args.label or args.other}: {problem}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
