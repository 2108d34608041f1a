"""``onnx`` backend: ONNX models on ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from inference.backends.base import Backend, TensorInfo, check_model_file, corrupt_model_error
from inference.errors import BackendUnavailableError, ModelError

__all__ = ["OnnxBackend"]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _tensor_info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else -1 for d in (arg.shape or ()))
    return TensorInfo(
        name=str(arg.name), shape=shape, dtype=np.dtype(_ORT_TYPES.get(arg.type, object))
    )


class OnnxBackend(Backend):
    key: ClassVar[str] = "onnx"
    suffixes: ClassVar[tuple[str, ...]] = (".onnx", ".ort")

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        super().__init__(model_path, threads=threads)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailableError(
                f"the 'onnx' backend needs ONNX Runtime, which is not installed ({err}): "
                "pip install 'edgefleet[onnx]' (or pip install onnxruntime)"
            ) from err
        check_model_file(model_path, self.suffixes, self.key)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; warnings about unused initializers are noise
        try:
            session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise corrupt_model_error(model_path, self.key, err) from err
        self._session: Any = session
        self.inputs = [_tensor_info(a) for a in session.get_inputs()]
        self.outputs = [_tensor_info(a) for a in session.get_outputs()]
        self._index_outputs()
        self._input_names = tuple(i.name for i in self.inputs)
        self._feed: dict[str, npt.NDArray[Any]] = {}
        self._results: list[npt.NDArray[Any]] = []
        self._run = session.run

    def set_input(self, array: npt.NDArray[Any], index: int = 0) -> None:
        self._feed[self._input_names[index]] = array

    def invoke(self) -> None:
        self._results = self._run(None, self._feed)

    def output(self, index: int) -> npt.NDArray[Any]:
        if not self._results:
            raise ModelError(f"{self!r}: output read before the first invoke()")
        return self._results[index]

    def batched(self, size: int) -> Backend | None:
        """A model exported with a dynamic first dimension takes any batch in one session."""
        if not self.inputs or not self.inputs[0].shape or self.inputs[0].shape[0] != -1:
            return None
        return OnnxBackend(self.model_path, threads=self.threads)

    def close(self) -> None:
        self._session = None
        self._results = []
        self._feed = {}
        self._run = self._closed

    def _closed(self, *_args: object) -> Any:
        raise ModelError(f"{self!r} was closed: load the model again to use it")
