"""The native TensorRT backend: a tledge ``.engine`` file run by TensorRT, with CUDA memory from cuda-python.

Written against the TensorRT 10/11 name-based tensor API (``num_io_tensors``,
``get_tensor_name``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), which TensorRT for RTX (module ``tensorrt_rtx_bindings``)
shares. Device memory, copies and the stream come from ``cuda-python``
(``cuda.bindings.runtime``); neither torch nor pycuda is needed.

An engine is tied to the TensorRT version and the GPU it was built for, so a
failed deserialization is reported as "rebuild the engine on this device", and
everything that is missing (tensorrt, cuda-python, a GPU) is a BackendError that
says what to install or what to use instead.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tledge_runtime.backends.base import Backend, score_output
from tledge_runtime.backends.nvidia import import_cudart, import_tensorrt, target_here
from tledge_runtime.errors import BackendError, ModelError
from tledge_runtime.model.engine_target import engine_mismatch
from tledge_runtime.model.meta import ModelMeta


class TensorRTBackend(Backend):
    """A deserialized engine, one execution context, device buffers sized for the largest batch.

    One execution context serves one inference at a time, so ``run`` holds a lock;
    the GPU is busy for the whole batch anyway.
    """

    name = "tensorrt"

    def __init__(self, plan: bytes, meta: ModelMeta, path: Path):
        found = import_tensorrt()
        if meta.engine is not None:
            # Refuse before deserializing: TensorRT's own message for a foreign engine is a log line, not a reason.
            why = engine_mismatch(meta.engine, target_here(found))
            if why is not None:
                raise BackendError(f"{path}: {why}", hint="rebuild the engine on this device: `tledge-runtime build "
                                                         "MODEL.onnx` (or `tledge export --engine`), or run the .onnx")
        trt = found.module
        self._cudart = cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or not count:
            why = _err_name(err) if err != cudart.cudaError_t.cudaSuccess else "the driver reports no devices"
            raise BackendError(f"{path}: no CUDA GPU is usable here ({why})",
                               hint="run TensorRT engines on a machine with an NVIDIA GPU and driver; "
                                    "on a CPU use the .onnx export")
        self._lock = threading.Lock()
        self._buffers: list[int] = []
        self._stream = None
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            version = getattr(trt, "__version__", "?")
            raise BackendError(f"{path}: TensorRT ({trt.__name__} {version}) cannot load this engine",
                               hint="engines only run on the TensorRT version and GPU they were built with; "
                                    "rebuild it on this device with `tledge export --engine`")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{path}: TensorRT could not create an execution context", hint="check free GPU memory")
        try:
            self._bind(meta, path)
        except BaseException:
            self.close()
            raise

    def _bind(self, meta: ModelMeta, path: Path) -> None:
        trt, engine, cudart = self._trt, self._engine, self._cudart
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ModelError(f"{path}: the engine has {len(inputs)} inputs, a tledge classifier has exactly 1",
                             hint="re-export the engine with `tledge export --engine`")
        if meta.output.name not in names:
            raise ModelError(f"{path}: the engine has no output named {meta.output.name!r} (tensors: {names})",
                             hint="re-export the engine with `tledge export --engine`")
        self.input_name, self.output_name = inputs[0], meta.output.name
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self.input_shape = tuple(d if d >= 0 else None for d in engine.get_tensor_shape(self.input_name))
        self.output_shape = tuple(d if d >= 0 else None for d in engine.get_tensor_shape(self.output_name))
        if self.input_shape and self.input_shape[0] is None:
            # Dynamic batch: the first optimization profile's (min, opt, max) bounds it.
            self.max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        else:
            self.max_batch = self.input_shape[0] if self.input_shape else 1
        largest = (self.max_batch,) + tuple(self.input_shape[1:])
        if any(d is None for d in largest):
            raise ModelError(f"{path}: the engine's input {self.input_name!r} has dynamic spatial dimensions",
                             hint="build the engine with a fixed image size (`tledge export --engine` does)")
        if not self._context.set_input_shape(self.input_name, largest):
            raise BackendError(f"{path}: TensorRT rejected input shape {largest}", hint="re-export the engine")
        self.score_name = score_output(meta)
        if self.score_name is not None and self.score_name not in names:
            raise ModelError(f"{path}: the engine has no out-of-distribution output {self.score_name!r}",
                             hint="re-export the engine with `tledge export --engine`")
        self._stream = _call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers.append(self._malloc(self.input_name, largest, self.input_dtype))
        # Every output gets a buffer (TensorRT needs an address for each); the ones read back are the logits and
        # the out-of-distribution score.
        self._outputs: dict[str, tuple[int, np.dtype]] = {}
        for name in (n for n in names if n != self.input_name):
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            ptr = self._malloc(name, tuple(self._context.get_tensor_shape(name)), dtype)
            self._buffers.append(ptr)
            self._outputs[name] = (ptr, dtype)

    def _malloc(self, name: str, shape: tuple, dtype: np.dtype) -> int:
        cudart = self._cudart
        nbytes = max(1, int(np.prod(shape))) * dtype.itemsize
        ptr = int(_call(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._context.set_tensor_address(name, ptr)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._execute(batch, (self.output_name,))[0]

    def run_scored(self, batch: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if self.score_name is None:
            return self.run(batch), None
        logits, score = self._execute(batch, (self.output_name, self.score_name))
        return logits, score

    def _execute(self, batch: np.ndarray, wanted: tuple[str, ...]) -> list[np.ndarray]:
        cudart = self._cudart
        host_in = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if host_in.shape[0] > self.max_batch:
            raise BackendError(f"batch of {host_in.shape[0]} exceeds the engine's maximum of {self.max_batch}",
                               hint="rebuild the engine with a larger batch profile, or pass smaller batches")
        with self._lock:
            if self._context is None:
                raise BackendError("this model was closed", hint="create a new Classifier")
            if not self._context.set_input_shape(self.input_name, host_in.shape):
                raise BackendError(f"TensorRT rejected input shape {host_in.shape}", hint="check the batch size")
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _call(cudart, cudart.cudaMemcpyAsync(self._buffers[0], host_in.ctypes.data, host_in.nbytes, h2d,
                                                 self._stream), "copy in")
            if not self._context.execute_async_v3(int(self._stream)):
                raise BackendError("TensorRT failed to run the engine", hint="see TensorRT's log above")
            outs = []
            for name in wanted:
                ptr, dtype = self._outputs[name]
                out = np.empty(tuple(self._context.get_tensor_shape(name)), dtype=dtype)
                _call(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self._stream), "copy out")
                outs.append(out)
            _call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outs

    def close(self) -> None:
        with self._lock:
            cudart = self._cudart
            for ptr in self._buffers:
                cudart.cudaFree(ptr)
            self._buffers = []
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            # Context before engine before runtime: each refers to the next.
            self._context = None
            self._engine = None
            self._runtime = None


def _call(cudart: Any, result: tuple, what: str) -> Any:
    """Unpack a cuda-python ``(err, value...)`` result, raising BackendError on a CUDA error."""
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error in {what}: {_err_name(err)}", hint="check the GPU driver and free GPU memory")
    return rest[0] if len(rest) == 1 else (rest or None)


def _err_name(err: Any) -> str:
    return getattr(err, "name", str(err))
