"""The OpenVINO backends: the ONNX file compiled by OpenVINO for the CPU (``pip install openvino``).

OpenVINO is the fastest CPU peer measured for int8 models on Intel CPUs, so the runtime can run the
same file on it for comparison or deployment. The model's metadata is still read by onnxruntime:
OpenVINO does not keep ONNX ``metadata_props``.

Precision: OpenVINO's CPU plugin runs float layers in bfloat16 by default on CPUs that have it (AVX-512
BF16, AMX), which is not the fp32 a model was verified in (max |Δlogit| 0.11 and 99.7% agreement on an
ELPV fp32 model, against ~1e-5 and 100%). ``openvino`` therefore always sets the inference precision
hint to f32; ``openvino-bf16`` is the faster bfloat16 mode, asked for by name and verified by
``tledge-runtime check`` like any other backend, never a silent default.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tledge_runtime.backends.base import Backend, Shape, score_output
from tledge_runtime.errors import BackendError, ModelError, first_line, import_optional
from tledge_runtime.fileio import cache_dir
from tledge_runtime.model.meta import ModelMeta


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU. Infer requests are not thread-safe, so each run borrows one from a pool."""

    def __init__(self, path: Path, meta: ModelMeta, threads: int | None, precision: str = "f32"):
        ov = _import_openvino()
        if precision not in ("f32", "bf16"):
            raise BackendError(f"unknown OpenVINO precision {precision!r}", hint="use f32 or bf16")
        if precision == "bf16" and not cpu_supports_bf16():
            raise BackendError("backend 'openvino-bf16': this CPU has no bfloat16 support",
                               hint="use backend 'openvino' (f32)")
        self.name = "openvino" if precision == "f32" else "openvino-bf16"
        self.precision = precision
        # CACHE_DIR: OpenVINO keeps the compiled model, so the next start loads it instead of compiling.
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                                  "CACHE_DIR": str(cache_dir("openvino"))}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:
            raise ModelError(f"{path}: OpenVINO cannot compile this model ({first_line(e)})",
                             hint="use an onnxruntime backend (leave backend out)") from None
        if len(self._compiled.inputs) != 1:
            count = len(self._compiled.inputs)
            raise ModelError(f"{path}: the graph has {count} inputs, a tledge classifier has exactly 1",
                             hint="re-export the model with `tledge export`")
        port_in = self._compiled.input(0)
        port_out = next((o for o in self._compiled.outputs if meta.output.name in o.get_names()), None)
        if port_out is None:
            raise ModelError(f"{path}: graph has no output named {meta.output.name!r}",
                             hint="the metadata belongs to another model; re-export it with `tledge export`")
        self.input_name, self.output_name = port_in.get_any_name(), meta.output.name
        self.input_dtype = np.dtype(port_in.get_element_type().to_dtype())
        self.input_shape = _ov_shape(port_in.get_partial_shape())
        self.output_shape = _ov_shape(port_out.get_partial_shape())
        self.max_batch = self.fixed_batch
        self._port_out = port_out
        self.score_name = score_output(meta)
        self._port_score = None
        if self.score_name is not None:
            self._port_score = next((o for o in self._compiled.outputs if self.score_name in o.get_names()), None)
            if self._port_score is None:
                raise ModelError(f"{path}: the graph has no out-of-distribution output {self.score_name!r}",
                                 hint="the metadata belongs to another model; re-export it with `tledge export`")
        self._idle: list[Any] = []  # infer requests not in use; grows to the number of concurrent callers
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._infer(batch)[self._port_out]

    def run_scored(self, batch: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        out = self._infer(batch)
        return out[self._port_out], None if self._port_score is None else out[self._port_score]

    def _infer(self, batch: np.ndarray) -> Any:
        with self._lock:
            if self._compiled is None:
                raise BackendError("this model was closed", hint="create a new Classifier")
            request = self._idle.pop() if self._idle else self._compiled.create_infer_request()
        try:
            # share_outputs=False: the result must outlive the request, which the next caller reuses.
            return request.infer({0: batch}, share_outputs=False)
        except Exception as e:
            raise BackendError(f"OpenVINO failed to run the model ({first_line(e)})",
                               hint="check the input batch size") from None
        finally:
            with self._lock:
                self._idle.append(request)

    def close(self) -> None:
        with self._lock:
            self._compiled = None
            self._idle.clear()


def _import_openvino() -> Any:
    return import_optional("openvino", BackendError, "OpenVINO is not installed", "pip install openvino")


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bfloat16 here (it lists BF16 among its capabilities)."""
    try:
        return "BF16" in _import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO, or a plugin that cannot say: no bf16 backend
        return False


def _ov_shape(partial: Any) -> Shape:
    if partial.rank.is_dynamic:
        return ()
    return tuple(d.get_length() if d.is_static else None for d in partial)
