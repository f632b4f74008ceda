"""Building TensorRT engines from tledge ONNX files, and the parse/build check TensorRT for RTX allows on a CPU.

Here in the runtime because both sides build: ``tledge export --engine`` on the machine that exports,
``tledge-runtime build`` on the device that runs the engine.

Engines are built from the fp16 ONNX and from the TensorRT-flavour int8 QDQ ONNX as
*strongly typed* networks: every tensor keeps the type the ONNX graph gives it, which is
how TensorRT 10+ builds explicit-precision models (TensorRT 11 has no implicit fp16/int8
builder flags at all). A dynamic batch axis gets one optimization profile
``(1, opt, max_batch)``; a fixed batch needs none. Full TensorRT reads and updates a timing
cache file, so a rebuild skips kernel timing it has done before.

Which TensorRT: ``tensorrt`` (data-centre GPUs, Jetson; engines named ``*.engine``), else
TensorRT for RTX's ``tensorrt_rtx_bindings`` (RTX GPUs; ``*.rtx.engine``). TensorRT for RTX
has no timing cache (its builder compiles ahead of time and specializes on the device
at load), and can build without a GPU for a named compute capability, which is what
:func:`check_onnx` uses to prove a graph parses and builds on a CPU-only machine. An
engine is written only after it ran on a GPU and passed verification.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from tledge_runtime.backends.nvidia import TensorRT
from tledge_runtime.errors import EngineBuildError
from tledge_runtime.fileio import atomic_write

log = logging.getLogger(__name__)

OPT_BATCH = 8  # the batch TensorRT tunes kernels for: a camera gateway or a dynamic batcher's typical load
CHECK_COMPUTE_CAPABILITY = "SM86"  # target of the CPU-only build check (any supported one proves the graph builds)


def build_plan(onnx_bytes: bytes, trt: TensorRT, *, input_name: str, sample_shape: tuple[int, ...],
               batch: Optional[int] = None, max_batch: int = 32, timing_cache: Optional[Path] = None,
               compute_capability: Optional[str] = None, tf32: bool = True) -> bytes:
    """Parse ``onnx_bytes`` into a strongly typed network and build a serialized engine (plan).

    ``sample_shape``: the input without its batch axis; ``batch``: fixed batch, or None for a
    profile over 1..``max_batch``; ``compute_capability`` (TensorRT for RTX only): build ahead of
    time for that GPU architecture (e.g. ``"SM86"``) instead of the GPU present. ``tf32=False``
    keeps float32 layers in true float32 (TensorRT uses TF32 on Ampere+ by default, ~1e-3
    relative error: fine for fp16/int8 engines, not for an fp32 engine held to 1e-4).
    """
    t = trt.module
    if not hasattr(t.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        raise EngineBuildError(f"{trt.describe()} cannot build strongly typed networks",
                          hint="install TensorRT 10 or newer (pip install tensorrt, or JetPack 6 on Jetson)")
    logger = _logger(t)
    builder = t.Builder(logger)
    network = builder.create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = t.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{trt.describe()}'s ONNX parser rejected the graph: {'; '.join(errors) or 'no reason'}",
                          hint="int8 engines need the TensorRT flavour (--target tensorrt); report other graphs")
    config = builder.create_builder_config()
    if not tf32 and hasattr(t.BuilderFlag, "TF32"):
        config.clear_flag(t.BuilderFlag.TF32)
    if batch is None:
        profile = builder.create_optimization_profile()
        opt = min(OPT_BATCH, max_batch)
        profile.set_shape(input_name, (1, *sample_shape), (opt, *sample_shape), (max_batch, *sample_shape))
        config.add_optimization_profile(profile)
    if compute_capability is not None:
        if trt.flavour != "tensorrt-rtx":
            raise EngineBuildError("building for a named compute capability needs TensorRT for RTX",
                              hint="build full TensorRT engines on the GPU that will run them")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(t.ComputeCapability, compute_capability), 0)
    cache = _load_timing_cache(config, trt, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{trt.describe()} could not build an engine from the graph",
                          hint="see TensorRT's log above; check free GPU memory and the TensorRT version")
    if cache is not None and timing_cache is not None:
        atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _error_text(error: Any) -> str:
    """A parser error in one line: what failed and why, without the CUDA-driver noise of GPU-less builds."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keep = [line for line in lines if "catchCudaError" not in line and "Cuda Runtime" not in line]
    return " / ".join(keep)[:600]


def _logger(t: Any) -> Any:
    """A TensorRT logger that writes to Python logging (stderr via the CLI), never to stdout,
    which carries the export table and --json."""

    class _ToLogging(t.ILogger):
        def __init__(self) -> None:
            t.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = {t.ILogger.INTERNAL_ERROR: logging.ERROR, t.ILogger.ERROR: logging.ERROR,
                     t.ILogger.WARNING: logging.WARNING}.get(severity, logging.DEBUG)
            # Ahead-of-time builds on a GPU-less machine report a CUDA driver error that is expected there.
            if "catchCudaError" in msg or "CUDA driver version is insufficient" in msg:
                level = logging.DEBUG
            log.log(level, "TensorRT: %s", msg)

    return _ToLogging()


def _load_timing_cache(config: Any, trt: TensorRT, path: Optional[Path]) -> Any:
    """Attach the timing cache in ``path`` (or a new one) to ``config``; full TensorRT only."""
    if path is None or trt.flavour != "tensorrt":
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("%s: timing cache does not match this TensorRT/GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def check_onnx(onnx_bytes: bytes, *, input_name: str, sample_shape: tuple[int, ...], batch: Optional[int] = None,
               max_batch: int = 32) -> str:
    """Parse and build ``onnx_bytes`` ahead of time with TensorRT for RTX (no GPU needed).

    Returns what ran (e.g. ``"TensorRT for RTX 1.7.1.116: parsed, built for SM86 (7.2 MB plan)"``);
    raises :class:`EngineBuildError` when the parser or builder refuses the graph or RTX is absent.
    """
    try:
        import tensorrt_rtx_bindings
    except ImportError:
        raise EngineBuildError("TensorRT for RTX is not installed", hint="pip install tensorrt-rtx-cu13-libs "
                               "tensorrt-rtx-cu13-bindings") from None
    trt = TensorRT(tensorrt_rtx_bindings, "tensorrt-rtx")
    plan = build_plan(onnx_bytes, trt, input_name=input_name, sample_shape=sample_shape, batch=batch,
                      max_batch=max_batch, compute_capability=CHECK_COMPUTE_CAPABILITY)
    return f"{trt.describe()}: parsed, built for {CHECK_COMPUTE_CAPABILITY} ({len(plan) / 1e6:.1f} MB plan)"


def build_engine_file(onnx_path: Path, out: Optional[Path] = None, *, max_batch: int = 32) -> Path:
    """``tledge-runtime build``: an engine for this device from a tledge ONNX file, with the same precision and
    metadata (plus what it was built for), written only after its reference set passes on this GPU.

    ``out`` defaults to the ONNX path with ``.engine``. A file already there is replaced only if it is a
    tledge engine. Needs TensorRT and an NVIDIA GPU: an engine is built and checked where it will run.
    """
    from tledge_runtime.backends.engine_file import is_engine_file, write_engine
    from tledge_runtime.backends.loader import read_meta
    from tledge_runtime.backends.nvidia import cuda_device_count, import_tensorrt, target_here
    from tledge_runtime.classifier import Classifier
    from tledge_runtime.errors import BackendError
    from tledge_runtime.fileio import cache_dir

    onnx_path = Path(onnx_path)
    out = Path(out) if out is not None else onnx_path.with_suffix(".engine")
    if out.exists() and not is_engine_file(out):
        raise BackendError(f"{out}: exists and is not a tledge engine; it is left as it is",
                           hint="pass another --out")
    meta = read_meta(onnx_path)
    trt = import_tensorrt()
    if not cuda_device_count():
        raise BackendError(f"no CUDA GPU here to build and check an engine for {onnx_path.name} on",
                           hint="run `tledge-runtime build` on the device that will run the engine; "
                                "the .onnx runs on this CPU as it is")
    p, spec = meta.preprocess, meta.input
    shape = (p.height, p.width, 3) if spec.layout == "NHWC" else (3, p.height, p.width)
    plan = build_plan(onnx_path.read_bytes(), trt, input_name=spec.name, sample_shape=shape, batch=spec.batch,
                      max_batch=max_batch, timing_cache=cache_dir("tensorrt") / "timing.cache",
                      tf32=meta.precision != "fp32")
    write_engine(out, meta.with_(engine=target_here(trt)), plan)
    try:
        Classifier(out, backend="tensorrt", check=True).close()
    except BaseException:
        out.unlink(missing_ok=True)  # never leave an unchecked engine behind
        raise
    log.info("wrote %s (%.1f MB, %s), reference check passed", out, out.stat().st_size / 1e6, trt.describe())
    return out
