"""edgefleet's inference core: backends, decoders, preprocessing, the detector, box
matching, batch inference and the golden-sample check.

It imports only :mod:`protocol` (never MQTT, the daemon or OTA code), so the agent daemon
and the controller's model tooling (golden outputs, quantization reports) run models
through the same code.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""The shipped models (BlazeFace fp16, INT8, ONNX) and the test video."""
