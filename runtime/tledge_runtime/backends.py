"""Inference backends behind one small interface, and the choice between them.

A :class:`Backend` holds one loaded model on one engine and turns a batch (the
graph's input tensor) into the graph's output (logits or probabilities):

- ``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``: ONNX Runtime with the CPU, CUDA or
  TensorRT execution provider (the last two need ``onnxruntime-gpu`` and a GPU);
- ``tensorrt``: a tledge ``.engine`` file run by TensorRT itself (:mod:`.trt_backend`);
- ``openvino``: the ONNX file compiled by OpenVINO for the CPU (:mod:`.openvino_backend`).

:func:`open_backend` reads the model's metadata, picks a backend (``device="auto"``:
an engine file -> ``tensorrt``; an ONNX file -> ``ort-tensorrt`` if usable, else
``ort-cuda``, else ``ort-cpu``), checks the graph against the metadata and logs its
choice in one line. onnxruntime, openvino and tensorrt are imported only here, only
when a model is opened, so ``import tledge_runtime`` stays fast.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .engine_file import is_engine_file, read_engine, read_engine_meta
from .errors import BackendError, MetadataError, ModelError, first_line
from .meta import ONNX_KEY, ModelMeta

log = logging.getLogger("tledge_runtime")

BACKENDS = ("ort-tensorrt", "ort-cuda", "ort-cpu", "tensorrt", "openvino")
DEVICES = ("auto", "cpu", "gpu")
_DEVICE_ALIASES = {"cuda": "gpu"}

_ORT_PROVIDER = {
    "ort-tensorrt": "TensorrtExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-cpu": "CPUExecutionProvider",
}
_ORT_NAME = {v: k for k, v in _ORT_PROVIDER.items()}
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
_PIP_GPU_HINT = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (on Jetson: the Jetson AI Lab wheel)"

Shape = tuple  # of int (fixed) or None (dynamic)


class Backend(ABC):
    """One model loaded on one inference engine. ``run`` is safe to call from several threads."""

    name: str = ""
    input_name: str = ""
    output_name: str = ""
    input_dtype: np.dtype = np.dtype(np.float32)
    input_shape: Shape = ()
    output_shape: Shape = ()
    max_batch: Optional[int] = None  # largest batch one run() accepts; None: no limit

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """The graph's output for ``batch`` (already in the graph's layout and dtype)."""

    def close(self) -> None:
        """Release the engine; the backend cannot run afterwards."""

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the graph requires, or None when its batch axis is dynamic."""
        return self.input_shape[0] if self.input_shape else None


@dataclass(frozen=True)
class Opened:
    """What :func:`open_backend` returns: the backend, the model's metadata and why this backend."""

    backend: Backend
    meta: ModelMeta
    reason: str


@dataclass(frozen=True)
class BackendInfo:
    """Whether one backend can run on this machine (for ``tledge-runtime info``)."""

    name: str
    available: bool
    detail: str


# --------------------------------------------------------------------------- choice


def open_backend(path: str | os.PathLike, *, device: str = "auto", backend: str | None = None,
                 threads: int | None = None) -> Opened:
    """Load the model at ``path`` on the best (or the requested) backend and check it against its metadata."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file", hint="check the path")
    if not path.is_file():
        raise ModelError(f"{path}: is not a file", hint="pass the .onnx or .engine file that `tledge export` wrote")
    device = _normalize_device(device)
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}, or leave it out")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BackendError(f"threads must be a positive integer, got {threads!r}",
                           hint="leave it out to use every core")

    if is_engine_file(path):
        opened = _open_engine(path, device, backend)
    elif backend == "tensorrt":
        raise BackendError(f"{path}: backend 'tensorrt' runs tledge .engine files, this is not one",
                           hint="pass the .engine file, or use backend='ort-tensorrt' "
                                "to run the ONNX file through TensorRT")
    elif backend == "openvino":
        opened = _open_openvino(path, device, threads)
    else:
        opened = _open_onnxruntime(path, device, backend, threads)
    try:
        check_io(opened.meta, opened.backend, path)
    except BaseException:
        opened.backend.close()
        raise
    log.info("%s: backend %s (%s)", path.name, opened.backend.name, opened.reason)
    return opened


def _normalize_device(device: str) -> str:
    d = _DEVICE_ALIASES.get(str(device).lower(), str(device).lower())
    if d not in DEVICES:
        raise BackendError(f"unknown device {device!r}", hint="use 'auto', 'cpu' or 'gpu'")
    return d


def _open_engine(path: Path, device: str, backend: str | None) -> Opened:
    if backend not in (None, "tensorrt"):
        raise BackendError(f"{path}: a TensorRT engine file runs only on backend 'tensorrt', not {backend!r}",
                           hint=f"use the .onnx export with backend {backend!r}")
    if device == "cpu":
        raise BackendError(f"{path}: a TensorRT engine needs an NVIDIA GPU, device='cpu' was asked for",
                           hint="use the .onnx export on a CPU")
    meta, plan = read_engine(path)
    from .trt_backend import TensorRTBackend  # tensorrt and cuda-python are imported inside

    return Opened(TensorRTBackend(plan, meta, path), meta, "engine file: native TensorRT")


def _open_openvino(path: Path, device: str, threads: int | None) -> Opened:
    if device == "gpu":
        raise BackendError("backend 'openvino' runs on the CPU here, device='gpu' was asked for",
                           hint="use device='cpu', or backend='ort-cuda' for an NVIDIA GPU")
    meta = read_meta(path)  # onnxruntime reads the metadata; OpenVINO drops ONNX metadata_props
    from .openvino_backend import OpenVinoBackend  # openvino is imported inside

    return Opened(OpenVinoBackend(path, meta, threads), meta, "requested: OpenVINO on the CPU")


# --------------------------------------------------------------------------- onnxruntime


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"onnxruntime is not installed ({e})",
                           hint="pip install onnxruntime (or onnxruntime-gpu on NVIDIA machines)") from None
    return onnxruntime


def _open_onnxruntime(path: Path, device: str, backend: str | None, threads: int | None) -> Opened:
    ort = _import_onnxruntime()
    chain, reason = _choose_providers(ort, device, backend)
    meta = None
    if "ort-tensorrt" in chain:
        # TensorRT's builder flags depend on the model's precision: read the metadata first
        # (a plain CPU load, small next to the engine build that follows).
        meta = read_meta(path)
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
    cache = Path(os.environ.get("TLEDGE_CACHE", Path.home() / ".cache" / "tledge")) / "ort-tensorrt"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create the TensorRT engine cache {cache} ({e.strerror or e})",
                           hint="point TLEDGE_CACHE at a writable folder") from None
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
    ort = _import_onnxruntime()
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

    def run(self, batch: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise BackendError("this model was closed", hint="create a new Classifier")
        try:
            return session.run([self.output_name], {self.input_name: batch})[0]
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


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The metadata of a model file (ONNX or tledge engine) without preparing it to run."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file", hint="check the path")
    if is_engine_file(path):
        return read_engine_meta(path)  # the header only: an engine file may be gigabytes
    return meta_from_session(ort_session(path, threads=1, optimize=False), path)


# --------------------------------------------------------------------------- checks


def check_io(meta: ModelMeta, backend: Backend, path: str | os.PathLike) -> None:
    """Refuse a graph whose input or output contradicts its metadata (ModelError)."""
    def fail(what: str) -> None:
        raise ModelError(f"{path}: {what}",
                         hint="the metadata does not describe this graph; re-export it with `tledge export`")

    spec, p = meta.input, meta.preprocess
    if backend.input_name != spec.name:
        fail(f"graph input is named {backend.input_name!r}, the metadata says {spec.name!r}")
    shape = backend.input_shape
    if len(shape) != 4:
        fail(f"graph input has shape {_fmt(shape)}, expected rank 4 ({spec.layout})")
    n, c, h, w = shape if spec.layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
    if c not in (None, 3):
        fail(f"graph input has {c} channels in {spec.layout} layout, expected 3")
    if (h not in (None, p.height)) or (w not in (None, p.width)):
        fail(f"graph input is {h}x{w}, the metadata's preprocessing makes {p.height}x{p.width}")
    if n is not None and spec.batch is not None and n != spec.batch:
        fail(f"graph input has batch {n}, the metadata says {spec.batch}")
    baked_graph = backend.input_dtype == np.uint8
    if baked_graph != (spec.dtype == "uint8"):
        fail(f"graph input is {backend.input_dtype}, the metadata says {spec.dtype}")
    # float16 vs float32 is not refused: the graph's own input type is what gets fed.
    out = backend.output_shape
    if len(out) != 2:
        fail(f"graph output {backend.output_name!r} has shape {_fmt(out)}, expected (batch, classes)")
    if out[1] is not None and out[1] != meta.num_classes:
        fail(f"graph output has {out[1]} classes, the metadata lists {meta.num_classes} labels")


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- what is installed


def cuda_device_count() -> int | None:
    """Number of CUDA GPUs the driver reports; 0 without a driver; None when cuda-python is absent (unknown)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def available_backends() -> list[BackendInfo]:
    """Each backend and whether it can run here, with the reason or the install command."""
    infos = []
    gpus = cuda_device_count()
    gpu_note = {0: "no CUDA GPU visible", None: "GPU unknown (cuda-python absent)"}.get(gpus, f"{gpus} CUDA GPU(s)")
    try:
        ort = _import_onnxruntime()
        providers = set(ort.get_available_providers())
        for name in ("ort-tensorrt", "ort-cuda", "ort-cpu"):
            present = _ORT_PROVIDER[name] in providers
            usable = present and (name == "ort-cpu" or gpus != 0)
            detail = (f"onnxruntime {ort.__version__}" + ("" if name == "ort-cpu" else f", {gpu_note}") if present
                      else f"onnxruntime {ort.__version__} has no {_ORT_PROVIDER[name]}: {_PIP_GPU_HINT}")
            infos.append(BackendInfo(name, usable, detail))
    except BackendError as e:
        infos.extend(BackendInfo(n, False, str(e)) for n in ("ort-tensorrt", "ort-cuda", "ort-cpu"))
    trt = next((m for m in ("tensorrt", "tensorrt_rtx_bindings") if importlib.util.find_spec(m)), None)
    if trt is None:
        infos.append(BackendInfo("tensorrt", False, "TensorRT not installed: pip install tensorrt cuda-python "
                                                    "(on Jetson: the TensorRT that JetPack ships)"))
    elif gpus is None:
        infos.append(BackendInfo("tensorrt", False,
                                 f"{trt} {_version(trt)} present, cuda-python missing: pip install cuda-python"))
    else:
        infos.append(BackendInfo("tensorrt", gpus > 0, f"{trt} {_version(trt)}, {gpu_note}"))
    if importlib.util.find_spec("openvino"):
        infos.append(BackendInfo("openvino", True, f"openvino {_version('openvino')} (CPU)"))
    else:
        infos.append(BackendInfo("openvino", False, "not installed: pip install openvino"))
    return infos


def _version(module: str) -> str:
    dist = {"tensorrt_rtx_bindings": "tensorrt_rtx_cu13_bindings"}.get(module, module)
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "(version unknown)"
