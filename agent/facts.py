"""Hardware and runtime facts the agent reports in its status (for fleet inventory)."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import psutil

RUNTIME_MODULES = {
    "litert": "ai_edge_litert",
    "tflite": "tflite_runtime",
    "onnx": "onnxruntime",
    "tensorrt": "tensorrt",
}


def _board() -> str | None:
    """Raspberry Pi / Jetson model string from the device tree, when there is one."""
    for path in (Path("/proc/device-tree/model"), Path("/sys/firmware/devicetree/base/model")):
        try:
            return path.read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip() or None
        except OSError:
            continue
    return None


def _accelerator() -> str | None:
    if Path("/etc/nv_tegra_release").exists():
        return "jetson"
    if Path("/dev/nvidia0").exists():
        return "nvidia"
    return None


def collect_facts() -> dict[str, str | int | float | bool | None]:
    """Cheap facts (no imports of the runtimes themselves): gathered once at start."""
    runtimes = [
        name for name, module in RUNTIME_MODULES.items() if importlib.util.find_spec(module)
    ]
    return {
        "arch": platform.machine(),
        "os": platform.platform(terse=True),
        "board": _board(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "runtimes": ",".join(runtimes),
        "accelerator": _accelerator(),
    }
