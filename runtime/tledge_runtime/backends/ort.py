"""ONNX Runtime backends (``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``), the one place sessions are made, and the
one reader of tledge metadata in ONNX files (:func:`meta_from_props`, used by tledge_export too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tledge_runtime.backends.base import Backend, Opened, score_output
from tledge_runtime.backends.nvidia import cuda_device_count
from tledge_runtime.errors import BackendError, MetadataError, ModelError, first_line, import_optional
from tledge_runtime.fileio import cache_dir
from tledge_runtime.model.meta import ONNX_KEY, ModelMeta

_ORT_PROVIDER = {
    "ort-tensorrt": "TensorrtExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-cpu": "CPUExecutionProvider",
}
_ORT_NAME = {v: k for k, v in _ORT_PROVIDER.items()}
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
_PIP_GPU_HINT = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (on Jetson: the Jetson AI Lab wheel)"


def import_onnxruntime() -> Any:
    return import_optional("onnxruntime", BackendError, "onnxruntime is not installed ({reason})",
                           "pip install onnxruntime (or onnxruntime-gpu on NVIDIA machines)")


def open_onnxruntime(path: Path, device: str, backend: str | None, threads: int | None) -> Opened:
    ort = import_onnxruntime()
    chain, reason = _choose_providers(ort, device, backend)
    meta = None
    if "ort-tensorrt" in chain:
        # TensorRT's builder flags depend on the model's precision: read the metadata first
        # (a plain CPU load, small next to the engine build that follows).
        meta = meta_from_session(ort_session(path, threads=1, optimize=False), path)
        quant = meta.quantization
        if quant is not None and quant.target != "tensorrt":
            if backend == "ort-tensorrt":
                raise BackendError(f"{path}: this int8 model is quantized for the CPU ({quant.activation_type} "
                                   "activations); TensorRT takes only symmetric int8",
                                   hint="use the TensorRT flavour of the int8 export, or backend='ort-cuda'")
            chain = [n for n in chain if n != "ort-tensorrt"]
            reason += "; TensorRT EP skipped: this int8 model is quantized for the CPU"
    providers = [_ORT_PROVIDER[n] for n in chain]
    session = ort_session(path, providers=providers, provider_options=[_provider_options(n, meta) for n in chain],
                          threads=threads)
    if meta is None:
        meta = meta_from_session(session, path)
    used, wanted = session.get_providers()[0], providers[0]
    if used != wanted:
        # ORT falls back (TensorRT -> CUDA -> CPU) when a provider cannot start: no driver, no GPU, missing libraries.
        if backend is not None or (device == "gpu" and used == "CPUExecutionProvider"):
            raise BackendError(f"{path}: onnxruntime could not start {wanted} (it fell back to {used})",
                               hint="check the NVIDIA driver, CUDA/cuDNN/TensorRT libraries and that a GPU is visible")
        reason = f"auto: {wanted} could not start here, fell back to {used}"
    return Opened(OrtBackend(session, meta, path), meta, reason)


def _choose_providers(ort: Any, device: str, backend: str | None) -> tuple[list[str], str]:
    """The ORT backends to try, best first (always ending with ort-cpu), and why."""
    available = set(ort.get_available_providers())
    gpu = [name for name in ("ort-tensorrt", "ort-cuda") if _ORT_PROVIDER[name] in available]
    if backend in ("ort-tensorrt", "ort-cuda"):
        if backend not in gpu:
            raise BackendError(f"backend {backend!r}: this onnxruntime has no {_ORT_PROVIDER[backend]}",
                               hint=_PIP_GPU_HINT)
        if device == "cpu":
            raise BackendError(f"backend {backend!r} runs on a GPU, device='cpu' was asked for",
                               hint="use backend='ort-cpu' or leave backend out")
        # TensorRT EP hands the nodes it cannot take to CUDA, then CPU (ONNX Runtime's documented chain).
        return gpu[gpu.index(backend):] + ["ort-cpu"], f"requested: {backend}"
    if backend == "ort-cpu" or device == "cpu":
        if device == "gpu":
            raise BackendError("backend 'ort-cpu' runs on the CPU, device='gpu' was asked for",
                               hint="use backend='ort-cuda' or leave backend out")
        return ["ort-cpu"], "requested: CPU"
    if not gpu:
        if device == "gpu":
            raise BackendError("device='gpu': this onnxruntime has no CUDA or TensorRT execution provider",
                               hint=_PIP_GPU_HINT)
        return ["ort-cpu"], "auto: this onnxruntime has no GPU provider; install onnxruntime-gpu for NVIDIA GPUs"
    if device == "auto" and cuda_device_count() == 0:
        return ["ort-cpu"], "auto: onnxruntime-gpu is installed but no CUDA GPU is visible"
    who = "auto" if device == "auto" else "device=gpu"
    return gpu + ["ort-cpu"], f"{who}: fastest provider present is {_ORT_PROVIDER[gpu[0]]}"


def _provider_options(name: str, meta: ModelMeta | None) -> dict:
    if name != "ort-tensorrt":
        return {}
    # TensorRT EP builds an engine on first load (tens of seconds for a ResNet on Jetson);
    # the engine and timing caches make every later start take a fraction of that.
    cache = cache_dir("ort-tensorrt")
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    # TensorRT refuses fp16 or Q/DQ int8 layers unless the matching builder flag is set. fp32 models get
    # neither, so TensorRT never lowers precision behind the verified model's back.
    if meta is not None and meta.precision == "fp16":
        options["trt_fp16_enable"] = True
    if meta is not None and meta.precision == "int8":
        options["trt_int8_enable"] = True  # explicit Q/DQ scales: no calibration table
    return options


def ort_session(model: str | os.PathLike | bytes, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                provider_options: Sequence[dict] | None = None, threads: int | None = None,
                optimize: bool = True) -> Any:
    """An onnxruntime InferenceSession of ``model`` (a file or its bytes): the one place sessions are made.

    Full graph optimization by default (what a device runs); errors only in onnxruntime's log (provider
    fallbacks are explained by tledge, in one line); ``threads`` CPU threads per run. A model onnxruntime
    refuses is a :class:`ModelError`.
    """
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=so, providers=list(providers),
                                    provider_options=list(provider_options or [{} for _ in providers]))
    except Exception as e:
        where = "the model" if isinstance(model, bytes) else str(model)
        raise ModelError(f"{where}: onnxruntime cannot load this model ({first_line(e)})",
                         hint="pass the .onnx file `tledge export` wrote; re-export it if it is truncated") from None


class OrtBackend(Backend):
    """ONNX Runtime. ``InferenceSession.run`` is thread-safe, so no lock is needed."""

    def __init__(self, session: Any, meta: ModelMeta, path: Path):
        self._session = session
        self.name = _ORT_NAME.get(session.get_providers()[0], "ort-cpu")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"{path}: the graph has {len(inputs)} inputs, a tledge classifier has exactly 1",
                             hint="re-export the model with `tledge export`")
        self.input_name = inputs[0].name
        if inputs[0].type not in _ORT_DTYPES:
            raise ModelError(f"{path}: graph input {self.input_name!r} has type {inputs[0].type}, "
                             "expected float, float16 or uint8", hint="re-export the model with `tledge export`")
        self.input_dtype = np.dtype(_ORT_DTYPES[inputs[0].type])
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape)
        output = next((o for o in outputs if o.name == meta.output.name), None)
        if output is None:
            names = [o.name for o in outputs]
            raise ModelError(f"{path}: graph has no output named {meta.output.name!r} (outputs: {names})",
                             hint="the metadata belongs to another model; re-export it with `tledge export`")
        self.output_name = output.name
        self.output_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in output.shape)
        self.max_batch = self.fixed_batch
        self.score_name = score_output(meta)
        if self.score_name is not None and self.score_name not in {o.name for o in outputs}:
            raise ModelError(f"{path}: the metadata names an out-of-distribution output {self.score_name!r} the "
                             f"graph does not have (outputs: {[o.name for o in outputs]})",
                             hint="the metadata belongs to another model; re-export it with `tledge export`")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._run([self.output_name], batch)[0]

    def run_scored(self, batch: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if self.score_name is None:
            return self.run(batch), None
        logits, score = self._run([self.output_name, self.score_name], batch)
        return logits, score

    def _run(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise BackendError("this model was closed", hint="create a new Classifier")
        try:
            return session.run(names, {self.input_name: batch})
        except Exception as e:
            raise BackendError(f"onnxruntime failed to run the model ({first_line(e)})",
                               hint="check the input batch size and the device's free memory") from None

    def close(self) -> None:
        self._session = None  # the C++ session is freed with its last reference


def meta_from_session(session: Any, path: Path) -> ModelMeta:
    """The tledge metadata of an ONNX model, read from an onnxruntime session (no ``onnx`` package needed)."""
    return meta_from_props(session.get_modelmeta().custom_metadata_map, str(path))


def meta_from_props(props: Mapping[str, str], where: str) -> ModelMeta:
    """The tledge metadata in an ONNX model's ``metadata_props`` (key/value pairs): the one ONNX metadata
    reader, for onnxruntime sessions here and ``onnx`` protos in tledge_export."""
    if ONNX_KEY not in props:
        raise MetadataError(f"{where}: the ONNX file carries no tledge metadata (metadata_props key {ONNX_KEY!r})",
                            hint="export the model with `tledge export`, which writes labels and preprocessing into it")
    try:
        return ModelMeta.from_json(props[ONNX_KEY])
    except MetadataError as e:
        raise MetadataError(f"{where}: {e.message}", hint=e.hint) from None
