"""``tflite`` backend: TFLite models on Google's tflite-runtime wheel.

A fallback for devices where ai-edge-litert has no wheel. tflite-runtime 2.14 needs
numpy < 2; it crashed (segfault) on a sparse model here, so prefer ``litert``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from inference.backends.litert import TFLiteInterpreterBackend
from inference.errors import BackendUnavailableError

__all__ = ["TFLiteRuntimeBackend"]


class TFLiteRuntimeBackend(TFLiteInterpreterBackend):
    key: ClassVar[str] = "tflite"

    @classmethod
    def _interpreter_class(cls) -> Any:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as err:
            raise BackendUnavailableError(
                f"the 'tflite' backend needs tflite-runtime, which is not installed ({err}): "
                "pip install tflite-runtime (needs numpy<2), or use the 'litert' backend "
                "(pip install ai-edge-litert)"
            ) from err
        return Interpreter
