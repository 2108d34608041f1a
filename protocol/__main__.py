"""``python -m protocol [DIR]``: write the JSON Schemas (default docs/protocol)."""

from __future__ import annotations

import sys
from pathlib import Path

from protocol.jsonschema import render


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/protocol")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
