"""Run one model through the ``tflite`` (tflite-runtime) backend, in its own interpreter.

tflite-runtime needs numpy < 2, so it cannot share the main test venv; tests run this
script with ``.venv-tflite/bin/python`` and ``PYTHONPATH`` = the repository root:

    python tests/tflite_probe.py MODEL.tflite INPUT.npy OUT.npz

It loads MODEL with ``inference.backends.create_backend("tflite", ...)``, feeds INPUT, saves
every output (raw, still quantized) in OUT under its name, and prints one JSON line
describing the tensors. It imports only numpy and the inference core's backend package (no
OpenCV), which is part of what the test checks. Exit code 2 on an inference error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _describe(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "shape": list(info.shape),
        "dtype": str(info.dtype),
        "scale": info.scale,
        "zero_point": info.zero_point,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 64
    model, input_path, out_path = (Path(a) for a in argv)
    from inference.backends import create_backend
    from inference.errors import InferenceError

    try:
        backend = create_backend("tflite", model, threads=1)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        backend.set_input(np.load(input_path))
        backend.invoke()
        outputs = {info.name: backend.output(i) for i, info in enumerate(backend.outputs)}
        by_name = {
            name: bool(np.array_equal(backend.output_by_name(name), array))
            for name, array in outputs.items()
        }
    finally:
        backend.close()
    np.savez(out_path, **outputs)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
    report = {
        "backend": backend.key,
        "numpy": np.__version__,
        "cv2_loaded": "cv2" in sys.modules,
        "inputs": [_describe(i) for i in backend.inputs],
        "outputs": [_describe(i) for i in backend.outputs],
        "output_by_name_matches": by_name,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
