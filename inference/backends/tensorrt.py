"""``tensorrt`` backend: serialized TensorRT engines (``.engine`` / ``.plan``) on an NVIDIA GPU.

Uses the name-based I/O API of TensorRT 8.6 and 10 (``num_io_tensors``,
``set_tensor_address``, ``execute_async_v3``) and CUDA through ``cuda-python``
(``cuda.bindings.runtime`` or the older ``cuda.cudart``), or ``pycuda`` when that is what
the device has (JetPack images often ship it). Everything is imported only when this
backend is chosen. An engine is specific to the GPU and TensorRT version that built it:
build it on the device (``trtexec --onnx=model.onnx --saveEngine=model.engine``).

Per invoke: copy inputs host -> device, enqueue, copy outputs device -> host, wait.
Dynamic input shapes are fixed once, at load, to the first optimization profile's
"opt" shape.

Cross-stream batching (:meth:`Backend.batched`) is not offered here: it would need an
engine built with a dynamic batch dimension and an optimization profile covering the batch
sizes (``trtexec --minShapes=input:1x... --optShapes=input:4x... --maxShapes=input:8x...``),
then ``set_input_shape`` per batch size and device buffers sized for the largest. That has
no GPU to be tested on here, so a TensorRT stream always runs its own calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from inference.backends.base import Backend, TensorInfo, check_model_file, corrupt_model_error
from inference.errors import BackendUnavailableError, ModelError

__all__ = ["TensorRTBackend"]

log = logging.getLogger(__name__)

_INSTALL = (
    "install edgefleet[tensorrt] on a Jetson (TensorRT ships with JetPack) "
    "or a machine with an NVIDIA GPU"
)


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(
            f"the 'tensorrt' backend needs TensorRT, which is not installed ({err}): {_INSTALL}"
        ) from err
    return tensorrt


class _CudaPython:
    """CUDA runtime calls through NVIDIA's cuda-python bindings."""

    def __init__(self, cudart: Any) -> None:
        self._rt = cudart
        self._ok = cudart.cudaError_t.cudaSuccess
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle: Any = self.stream

    def _check(self, result: tuple[Any, ...], what: str) -> Any:
        err = result[0]
        if err != self._ok:
            raise ModelError(f"CUDA call {what} failed ({err}): check the GPU and its driver")
        return result[1] if len(result) > 1 else None

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._rt.cudaFree(ptr)

    def htod(self, device_ptr: int, host: npt.NDArray[Any]) -> None:
        self._check(
            self._rt.cudaMemcpyAsync(
                device_ptr, host.ctypes.data, host.nbytes, self._h2d, self.stream
            ),
            "cudaMemcpyAsync",
        )

    def dtoh(self, host: npt.NDArray[Any], device_ptr: int) -> None:
        self._check(
            self._rt.cudaMemcpyAsync(
                host.ctypes.data, device_ptr, host.nbytes, self._d2h, self.stream
            ),
            "cudaMemcpyAsync",
        )

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def push(self) -> None:
        """The runtime API uses the device's primary context from any thread."""

    def pop(self) -> None:
        pass

    def close(self) -> None:
        self._rt.cudaStreamDestroy(self.stream)


class _PyCuda:
    """CUDA driver calls through pycuda, on the device's primary context."""

    def __init__(self, driver: Any) -> None:
        self._drv = driver
        driver.init()
        self._context = driver.Device(0).retain_primary_context()
        self._context.push()
        try:
            self.stream = driver.Stream()
        finally:
            self._context.pop()
        self.stream_handle: Any = self.stream.handle
        self._allocations: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(max(nbytes, 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        allocation = self._allocations.pop(ptr, None)
        if allocation is not None:
            allocation.free()

    def htod(self, device_ptr: int, host: npt.NDArray[Any]) -> None:
        self._drv.memcpy_htod_async(device_ptr, host, self.stream)

    def dtoh(self, host: npt.NDArray[Any], device_ptr: int) -> None:
        self._drv.memcpy_dtoh_async(host, device_ptr, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def push(self) -> None:
        self._context.push()

    def pop(self) -> None:
        self._context.pop()

    def close(self) -> None:
        self.stream = None


def _load_cuda() -> _CudaPython | _PyCuda:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.8
        except ImportError:
            cudart = None
    if cudart is not None:
        return _CudaPython(cudart)
    try:
        from pycuda import driver
    except ImportError as err:
        raise BackendUnavailableError(
            "the 'tensorrt' backend needs CUDA Python bindings, which are not installed: "
            f"pip install cuda-python (or pycuda); {_INSTALL}"
        ) from err
    return _PyCuda(driver)


class TensorRTBackend(Backend):
    key: ClassVar[str] = "tensorrt"
    suffixes: ClassVar[tuple[str, ...]] = (".engine", ".plan", ".trt")

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        super().__init__(model_path, threads=threads)
        trt = _import_tensorrt()
        check_model_file(model_path, self.suffixes, self.key)
        cuda = _load_cuda()
        self._cuda: _CudaPython | _PyCuda | None = cuda
        self._device_ptrs: list[int] = []
        cuda.push()
        try:
            self._load(trt, cuda, model_path)
        except BaseException:
            self._release()
            raise
        finally:
            cuda.pop()
        self._index_outputs()

    def _load(self, trt: Any, cuda: _CudaPython | _PyCuda, model_path: Path) -> None:
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        engine = self._runtime.deserialize_cuda_engine(model_path.read_bytes())
        if engine is None:
            raise corrupt_model_error(
                model_path,
                self.key,
                RuntimeError(
                    "deserialize_cuda_engine returned None; engines only load on the "
                    "TensorRT version and GPU that built them"
                ),
            )
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise ModelError(
                f"TensorRT cannot create an execution context for {model_path}: "
                "the GPU is out of memory or busy; free it and retry"
            )
        self._context = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in input_names:
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                # Dynamic shape: fix it to the first profile's optimum (min, opt, max).
                shape = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[1])
                context.set_input_shape(name, shape)
        self._host_inputs: list[npt.NDArray[Any]] = []
        self._host_outputs: list[npt.NDArray[Any]] = []
        self._input_ptrs: list[int] = []
        self._output_ptrs: list[int] = []
        for name in names:
            is_input = name in input_names
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(
                    f"TensorRT engine {model_path}: tensor {name!r} has a data-dependent "
                    f"shape {list(shape)}, which this backend does not support: export the "
                    "model with fixed output shapes"
                )
            trt_dtype = engine.get_tensor_dtype(name)
            try:
                dtype = np.dtype(trt.nptype(trt_dtype))
            except TypeError as err:
                raise ModelError(
                    f"TensorRT engine {model_path}: tensor {name!r} has type {trt_dtype}, which "
                    "numpy cannot hold: rebuild the engine with float32/float16/int8 I/O"
                ) from err
            host = np.empty(shape, dtype)
            ptr = cuda.malloc(host.nbytes)
            self._device_ptrs.append(ptr)
            context.set_tensor_address(name, ptr)
            info = TensorInfo(name=name, shape=shape, dtype=dtype)
            if is_input:
                self.inputs.append(info)
                self._host_inputs.append(host)
                self._input_ptrs.append(ptr)
            else:
                self.outputs.append(info)
                self._host_outputs.append(host)
                self._output_ptrs.append(ptr)
        log.info("TensorRT engine %s: inputs %s, outputs %s", model_path, self.inputs, self.outputs)

    def set_input(self, array: npt.NDArray[Any], index: int = 0) -> None:
        host = self._host_inputs[index]
        if array.shape != host.shape:
            raise ModelError(
                f"input {self.inputs[index].name!r} of {self.model_path} has shape "
                f"{host.shape}, got {array.shape}"
            )
        np.copyto(host, array, casting="same_kind")

    @property
    def computes_on_caller(self) -> bool:
        return False  # the GPU computes; the calling thread waits for it

    def invoke(self) -> None:
        cuda = self._cuda
        if cuda is None:
            raise ModelError(f"{self!r} was closed: load the model again to use it")
        cuda.push()
        try:
            for host, ptr in zip(self._host_inputs, self._input_ptrs, strict=True):
                cuda.htod(ptr, host)
            if not self._context.execute_async_v3(cuda.stream_handle):
                raise ModelError(
                    f"TensorRT failed to run {self.model_path}: see the TensorRT log above"
                )
            for host, ptr in zip(self._host_outputs, self._output_ptrs, strict=True):
                cuda.dtoh(host, ptr)
            cuda.synchronize()
        finally:
            cuda.pop()

    def output(self, index: int) -> npt.NDArray[Any]:
        copied: npt.NDArray[Any] = self._host_outputs[index].copy()
        return copied

    def _release(self) -> None:
        cuda = self._cuda
        if cuda is None:
            return
        for ptr in self._device_ptrs:
            cuda.free(ptr)
        self._device_ptrs = []
        # Drop TensorRT objects in dependency order: context, engine, runtime.
        for attr in ("_context", "_engine", "_runtime"):
            self.__dict__.pop(attr, None)
        cuda.close()
        self._cuda = None

    def close(self) -> None:
        cuda = self._cuda
        if cuda is None:
            return
        cuda.push()
        try:
            cuda.synchronize()
            self._release()
        finally:
            cuda.pop()
