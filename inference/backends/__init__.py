"""Detector backend registry: one module per runtime, imported only when chosen.

``BACKENDS`` maps a backend name to ``"module:Class"``; ``create_backend`` imports that
module and builds the backend. The runtime library (ai-edge-litert, tflite-runtime,
onnxruntime, TensorRT) is imported by the backend's constructor, so a missing one
raises BackendUnavailableError saying what to install, and only for the backend chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from inference.backends.base import Backend, TensorInfo, dequantize
from inference.errors import ModelError

__all__ = ["BACKENDS", "Backend", "TensorInfo", "create_backend", "dequantize", "model_family"]

BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "litert": "inference.backends.litert:LiteRTBackend",
        "tflite": "inference.backends.tflite:TFLiteRuntimeBackend",
        "onnx": "inference.backends.onnx:OnnxBackend",
        "tensorrt": "inference.backends.tensorrt:TensorRTBackend",
    }
)

_FAMILIES: Mapping[str, str] = MappingProxyType(
    {"litert": "tflite", "tflite": "tflite", "onnx": "onnx", "tensorrt": "tensorrt"}
)


def model_family(backend: str) -> str:
    """The model format a backend loads; ``litert`` and ``tflite`` share ``tflite``."""
    return _FAMILIES[_check_name(backend)]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ModelError(f"unknown detector backend {name!r}: choose one of {known}")
    return name


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered as ``name`` (imports its module, not its runtime)."""
    module_name, _, class_name = BACKENDS[_check_name(name)].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):  # pragma: no cover
        raise TypeError(f"{BACKENDS[name]} is not a Backend")
    return cls


def create_backend(name: str, model_path: Path, *, threads: int = 1) -> Backend:
    """Load ``model_path`` with backend ``name`` using ``threads`` CPU threads.

    Raises ModelError for an unknown name or a missing/corrupt model file, and
    BackendUnavailableError (a ModelError) when the runtime is not installed.
    """
    if threads < 1:
        raise ModelError(f"threads must be at least 1, not {threads}")
    return backend_class(name)(Path(model_path), threads=threads)
