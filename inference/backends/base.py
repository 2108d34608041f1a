"""What every detector backend offers: tensor metadata, set input, invoke, read outputs.

A backend wraps one inference runtime (LiteRT, tflite-runtime, ONNX Runtime, TensorRT)
and knows nothing about images or boxes. Its module imports only numpy and the agent's
errors at import time; the runtime itself is imported when a backend is constructed, so
a missing runtime fails only when chosen (and this module also works in the small
tflite-runtime environment, without OpenCV).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from inference.errors import ModelError


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Name, shape and element type of one model input or output.

    ``scale``/``zero_point`` are set for quantized tensors (real = (q - zero_point) * scale)
    and None for float tensors. Unknown (dynamic) dimensions are -1.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.zero_point is not None


def quantization(scale: float, zero_point: int) -> tuple[float | None, int | None]:
    """Runtime quantization pair -> (scale, zero_point), or (None, None) when not quantized."""
    if scale == 0.0:
        return None, None
    return float(scale), int(zero_point)


def dequantize(array: npt.NDArray[Any], info: TensorInfo) -> npt.NDArray[np.float32]:
    """Real values of an output tensor as float32 (a no-op view for float32 tensors)."""
    if info.scale is not None and info.zero_point is not None:
        out = array.astype(np.float32)
        out -= info.zero_point
        out *= info.scale
        return out
    return np.asarray(array, dtype=np.float32)


class Backend(abc.ABC):
    """One loaded model in one runtime. Not thread-safe: one thread invokes it."""

    key: ClassVar[str]
    """Registry name (``litert``, ``tflite``, ``onnx``, ``tensorrt``)."""
    suffixes: ClassVar[tuple[str, ...]]
    """Model file suffixes this runtime loads."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        self.model_path = model_path
        self.threads = threads
        self.inputs = []
        self.outputs = []
        self._output_names: dict[str, int] = {}

    def _index_outputs(self) -> None:
        """Cache output name -> index; call once ``outputs`` is filled."""
        self._output_names = {info.name: i for i, info in enumerate(self.outputs)}

    @abc.abstractmethod
    def set_input(self, array: npt.NDArray[Any], index: int = 0) -> None:
        """Copy (or reference) ``array`` as input ``index``; shape and dtype must match."""

    @abc.abstractmethod
    def invoke(self) -> None:
        """Run the model on the current inputs."""

    @property
    def computes_on_caller(self) -> bool:
        """Whether ``invoke`` does all its work on the calling thread (one CPU thread), so that
        the thread's CPU time over the call is the model's cost; False for a GPU or where a
        thread pool shares the work."""
        return self.threads == 1

    def timed_invoke(self) -> tuple[float, float | None]:
        """``invoke()``, returning its wall-clock milliseconds and the calling thread's CPU
        milliseconds over it (None unless :attr:`computes_on_caller`)."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        self.invoke()
        cpu_s = time.thread_time() - cpu_start
        wall_s = time.perf_counter() - start
        return wall_s * 1000.0, cpu_s * 1000.0 if self.computes_on_caller else None

    @abc.abstractmethod
    def output(self, index: int) -> npt.NDArray[Any]:
        """Output ``index`` of the last invoke (raw: quantized outputs stay quantized).

        The array belongs to the caller: a later invoke does not change it.
        """

    def output_index(self, name: str) -> int:
        """Index of the output called ``name``; ModelError listing the names otherwise."""
        try:
            return self._output_names[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._output_names) or "none"
            raise ModelError(
                f"model {self.model_path} has no output named {name!r} (outputs: {known}): "
                "fix the output name in the model manifest"
            ) from None

    def output_by_name(self, name: str) -> npt.NDArray[Any]:
        return self.output(self.output_index(name))

    def batched(self, size: int) -> Backend | None:
        """A second instance of this model taking ``size`` frames in one ``invoke`` (input 0's
        first dimension), or None where the runtime or the model cannot batch. The outputs'
        layout is not promised: :mod:`inference.batching` finds it by probing."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; the backend cannot be used afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.model_path)!r}, threads={self.threads})"


def check_model_file(path: Path, suffixes: tuple[str, ...], backend: str) -> None:
    """ModelError when the model file is missing, empty or has the wrong kind of name."""
    if not path.is_file():
        raise ModelError(
            f"model file {path} not found: check the path, or reinstall the model bundle"
        )
    if path.stat().st_size == 0:
        raise ModelError(f"model file {path} is empty: re-download or reinstall the model bundle")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ModelError(
            f"model file {path} is not a {' / '.join(suffixes)} file, which the {backend!r} "
            "backend loads: choose the backend that matches the model format"
        )


def corrupt_model_error(path: Path, backend: str, err: BaseException) -> ModelError:
    return ModelError(
        f"model file {path} cannot be loaded by the {backend!r} backend ({err}): "
        "the file is corrupt or not a model for this runtime; re-download or reinstall "
        "the model bundle"
    )
