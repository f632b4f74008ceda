"""Quantization-aware fine-tuning (QAT) for int8, when post-training calibration misses the budget.

Post-training int8 rounds every weight and activation of a model trained in float; most
images keep their answer, borderline ones flip. QAT fine-tunes a copy of the model for a
few hundred steps *through* simulated int8 (fake quantization, straight-through gradients)
so its weights settle where rounding no longer moves the answer, with the fp32 model as
teacher: the loss is the KL divergence between the two models' softened logits (plus,
optionally, cross-entropy on the labels), so the int8 model learns to *agree* with fp32,
which is what tledge's budget measures.

Library: NVIDIA Model Optimizer (``nvidia-modelopt``, extra ``tledge-export[qat]``)
provides the fake quantizers, their calibration and the straight-through estimator.
Its int8 is the scheme of tledge's ``tensorrt`` flavour exactly (symmetric s8 activations,
``amax / 127``; symmetric per-channel 7-bit weights, ``max|w| / 63`` (ONNX Runtime's reduced range is
``max|w| / 64``), recomputed every step as ONNX Runtime computes them at export). For the ``cpu`` flavour, activations that are never
negative (ReLU/ReLU6 outputs, most of a CNN) are simulated as unsigned, ``max / 255``: what
ONNX Runtime's asymmetric u8 gives them; signed ones are simulated symmetric, a grid
no finer than the asymmetric one they get at export.

The int8 file is written by the same ONNX Runtime QDQ quantizer as post-training int8
(:mod:`tledge_export.int8.quantize`), from the fine-tuned weights and the same calibration images: the graph
has the same Q/DQ placement and types (cpu: u8 activations, s8 per-channel weights,
int32 biases; tensorrt: symmetric s8, float biases; logits in float), so it runs exactly
as fast as the post-training model and TensorRT's parser takes it as it takes that one.

BatchNorm is folded into the convolutions before anything is quantized (the exported
graph has no BatchNorm either), which also freezes its statistics during the short
fine-tune, as QAT recipes do.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import onnx

from tledge_export.config import WEIGHT_BITS
from tledge_export.errors import ExportError
from tledge_export.int8.qat_fold import fold_batchnorm, unactivated_convs
from tledge_runtime.model.meta import Preprocess, Quantization

if TYPE_CHECKING:  # torch loads only when QAT runs
    from tledge_export.normalize import Normalize

log = logging.getLogger(__name__)

LIBRARY = "nvidia-modelopt"
TEACHER_BATCH = 64  # images per teacher / calibration forward pass
LOG_EVERY = 10  # steps between progress lines in the log


@dataclass(frozen=True)
class QATConfig:
    """The knobs of one QAT run. Defaults: the best of the few ELPV EfficientNet-Lite0 runs measured
    (benchmarks/qat_elpv.py; lr 5e-5 made the distillation loss rise, 1e-5 x 40 steps and 2e-5 x 100
    steps both lowered it and the flips)."""

    target: str = "cpu"  # int8 flavour: cpu (u8 activations) | tensorrt (symmetric s8), as tledge_export.int8.quantize
    steps: int = 100  # optimizer steps (~4 s each for Lite0 at 224 px, batch 16, on 2 idle CPU cores)
    batch_size: int = 16
    lr: float = 2e-5  # AdamW, cosine-decayed to 0 over the steps; the fp32 model is already trained
    weight_decay: float = 0.0  # the teacher, not a prior, keeps the weights where they were
    temperature: float = 2.0  # distillation softmax temperature (>1 also teaches the non-top classes' order)
    label_weight: float = 0.0  # weight of cross-entropy on the labels next to distillation (0: distillation only)
    hflip: bool = True  # also train on mirrored images (the teacher's logits are computed for both views)
    calibration_images: int = 300  # images that set the activation ranges when none are given (as `tledge export`)
    seed: int = 0

    def validate(self) -> None:
        from tledge_export.config import TARGETS

        checks = [(self.target in TARGETS, f"unknown int8 target {self.target!r}", f"choose one of {', '.join(TARGETS)}"),
                  (self.steps >= 1, "QAT needs at least one step", "e.g. steps=300"),
                  (self.batch_size >= 1, "QAT batch size must be at least 1", "e.g. batch_size=32"),
                  (0 < self.lr <= 1, f"QAT learning rate {self.lr} is not in (0, 1]", "e.g. lr=1e-5"),
                  (self.weight_decay >= 0, "weight decay cannot be negative", "e.g. weight_decay=0"),
                  (self.temperature > 0, "distillation temperature must be positive", "e.g. temperature=2"),
                  (self.label_weight >= 0, "label weight cannot be negative", "0 distils only"),
                  (self.calibration_images >= 1, "QAT needs calibration images", "e.g. calibration_images=256")]
        for ok, message, hint in checks:
            if not ok:
                raise ExportError(message, hint=hint)


@dataclass(frozen=True)
class QATResult:
    """The int8 QDQ model and what describes it (for the metadata and report.json)."""

    model: Optional[onnx.ModelProto]  # the int8 QDQ graph, input ``input`` NCHW float32, output ``logits``
    float_model: onnx.ModelProto  # the fine-tuned weights as an fp32 graph (for accuracy-aware int8 on top)
    quantization: Optional[Quantization]  # method "qat"; the rest as post-training int8 records it
    details: dict[str, Any] = field(default_factory=dict)  # library, steps, distillation, losses, seconds


def qat_int8(model: Any, images: np.ndarray, preprocess: Preprocess, *, labels: Optional[np.ndarray] = None,
             calib_images: Optional[np.ndarray] = None, config: QATConfig = QATConfig(),
             batch: Optional[int] = None, opset: int = 18, progress: Optional[Callable[..., Any]] = None,
             quantize: bool = True) -> QATResult:
    """Fine-tune a copy of ``model`` through simulated int8 with ``model`` as teacher; return the int8 QDQ ONNX.

    ``model``: the fp32 PyTorch classifier (left unchanged); ``images``: uint8 NHWC training images at
    the model's input size (``preprocess.height`` x ``preprocess.width``), normalized here exactly as
    the runtime does (:func:`tledge_runtime.image.preprocess.normalize_factors`); ``labels``: their class
    indices, needed only when ``config.label_weight > 0``. ``calib_images`` (uint8 NHWC) set the
    activation ranges, in training and in the exported graph: pass the images post-training int8
    calibrates on; default: ``config.calibration_images`` of ``images`` in a seeded order. ``batch``: the exported graph's fixed batch,
    None for a dynamic batch axis. ``progress``: a tqdm-like factory, optional. ``quantize=False``: return
    only the fine-tuned fp32 graph (``model`` and ``quantization`` None), for a caller that quantizes it
    itself (:func:`tledge_export.int8.step.export_qat` runs the accuracy-aware search on it).
    Raises :class:`ExportError` when the library is missing or the inputs do not fit.
    """
    import torch

    from tledge_export.normalize import Normalize

    _check_inputs(config, images, labels)
    mtq = _modelopt()
    x_all = _check_images(images, preprocess)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(x_all))
    normalize = Normalize(preprocess)

    core, rewrap = _logits_part(model)
    teacher = copy.deepcopy(core).float().cpu().eval()
    student = copy.deepcopy(teacher)
    folded = fold_batchnorm(student, normalize(x_all[order[:8]]))
    clean = copy.deepcopy(student)  # the float architecture the fine-tuned weights go back into for export

    phases = _Phases()
    lap = phases.lap
    views = (False, True) if config.hflip else (False,)
    with torch.no_grad():  # the teacher's logits, once per image and view
        targets = {v: _batched(teacher, x_all, normalize, flip=v) for v in views}
    lap("teacher")
    log.info("QAT: teacher logits of %d images x %d view(s) in %.0f s", len(x_all), len(views), phases.seconds["teacher"])
    calib = x_all[order[:config.calibration_images]] if calib_images is None else _check_images(calib_images, preprocess)
    quantizers = _quantize(mtq, student, calib, normalize, config.target)
    lap("calibrate")
    log.info("QAT: %s, calibrated on %d images in %.0f s", quantizers, len(calib), phases.seconds["calibrate"])
    losses = _train(student, x_all, labels, targets, normalize, config, rng, progress)
    lap("train")
    state = {k: v for k, v in student.state_dict().items() if k in clean.state_dict()}
    clean.load_state_dict(state, strict=True)
    fp32, qdq, quant = _export(rewrap(clean.eval()), calib, normalize, preprocess, config.target, batch, opset,
                               quantize)
    lap("export")
    details = _details(config, len(x_all), len(calib), folded, quantizers, losses, time.perf_counter() - started,
                       phases.seconds)
    log.info("QAT: %d steps in %.0f s, loss %.4f -> %.4f", config.steps, details["seconds"], losses[0],
             details["loss_last"])
    return QATResult(qdq, fp32, replace(quant, method="qat") if quant else None, details)


def _check_inputs(config: QATConfig, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    config.validate()
    if config.label_weight > 0 and (labels is None or len(labels) != len(images)):
        raise ExportError("QAT with label_weight > 0 needs one label per training image",
                          hint="pass labels=..., or label_weight=0 to distil only")


def _logits_part(model: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The part QAT trains (image -> logits) and how to put the fine-tuned part back into the exported model: a
    model with an out-of-distribution score keeps its (float, never quantized) head on the new features."""
    from torch import nn

    from tledge_export.convert.ood_head import WithScore

    if not isinstance(model, WithScore):
        return model, lambda clean: clean
    head = copy.deepcopy(model.ood)
    return nn.Sequential(model.features, model.classifier), lambda clean: WithScore(clean[0], clean[1], head).eval()


class _Phases:
    """Wall seconds of each phase of a QAT run, for report.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._clock = round(now - self._clock, 1), now


def _details(config: QATConfig, images: int, calibration: int, folded: int, quantizers: dict[str, int],
             losses: list[float], seconds: float, phases: dict[str, float]) -> dict[str, Any]:
    """What a QAT run did, as report.json records it."""
    return {"library": f"{LIBRARY} {_version()}", "steps": config.steps, "batch_size": config.batch_size,
            "lr": config.lr, "weight_decay": config.weight_decay, "temperature": config.temperature,
            "label_weight": config.label_weight, "hflip": config.hflip, "images": images,
            "calibration_images": calibration, "folded_batchnorms": folded, "quantizers": quantizers,
            "distillation": f"KL(teacher || student) at T={config.temperature}"
                            + (f" + {config.label_weight} x CE(labels)" if config.label_weight > 0 else ""),
            "loss_first": losses[0], "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "seconds": round(seconds, 1), "phase_seconds": phases}


# --- the steps ------------------------------------------------------------------------------------

def _check_images(images: np.ndarray, p: Preprocess) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (p.height, p.width, 3):
        raise ExportError(f"QAT images are {x.dtype} {x.shape}, expected uint8 (N, {p.height}, {p.width}, 3)",
                          hint="decode the training images at the model's input size (as for calibration)")
    if len(x) < 2:
        raise ExportError(f"QAT needs training images, {len(x)} given", hint="pass the run's training split")
    return x


def _batched(net: Any, x_u8: np.ndarray, normalize: Normalize, *, flip: bool = False) -> Any:
    import torch

    return torch.cat([net(normalize(x_u8[i:i + TEACHER_BATCH], flip)) for i in range(0, len(x_u8), TEACHER_BATCH)])


def _quantize(mtq: Any, student: Any, calib: np.ndarray, normalize: Normalize, target: str) -> dict[str, int]:
    """Insert ModelOpt's fake quantizers where ONNX Runtime puts Q/DQ and calibrate them (one pass over
    ``calib``); returns their counts by kind."""
    import torch

    outputs = unactivated_convs(student, normalize(calib[:2]))
    # max|w| per output channel, every step, on the grid the export uses (7-bit weights: tledge_export.config)
    weight = {"num_bits": WEIGHT_BITS, "axis": 0, "type": "dynamic"}
    act = {"num_bits": 8, "axis": None}
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer", "cfg": weight},
                         {"quantizer_name": "*input_quantizer", "cfg": act},
                         *[{"quantizer_name": f"{name}.output_quantizer", "cfg": act} for name in outputs]],
           "algorithm": "max"}
    _register_subclasses(mtq, student)
    with _quiet():
        mtq.quantize(student, cfg, forward_loop=None)  # quantizers in place; calibrated below
    activations = {n: q for n, q in student.named_modules()
                   if type(q).__name__ == "TensorQuantizer" and q.is_enabled and not n.endswith("weight_quantizer")}
    lowest = dict.fromkeys(activations, 0.0)

    def record(name: str) -> Callable[..., None]:
        def hook(_m: Any, inputs: Any) -> None:
            lowest[name] = min(lowest[name], float(inputs[0].min()))
        return hook

    def loop(net: Any) -> None:
        with torch.no_grad():
            for i in range(0, len(calib), TEACHER_BATCH):
                net(normalize(calib[i:i + TEACHER_BATCH]))

    hooks = [q.register_forward_pre_hook(record(n)) for n, q in activations.items()]
    try:
        with _quiet():
            mtq.calibrate(student, algorithm="max", forward_loop=loop)
    finally:
        for h in hooks:
            h.remove()
    if target == "cpu":  # never-negative activations: unsigned, max/255, the grid ORT's asymmetric u8 gives them
        for n, q in activations.items():
            q.unsigned = lowest[n] >= 0
    weights = sum(1 for n, q in student.named_modules() if n.endswith("weight_quantizer") and q.is_enabled)
    return {"weights": weights, "activations": len(activations),
            "unsigned_activations": sum(1 for q in activations.values() if q.unsigned)}


def _register_subclasses(mtq: Any, net: Any) -> None:
    """ModelOpt picks a module's fake-quant wrapper by its exact class, so a ``Conv2d`` subclass (timm's
    ``Conv2dSame``: every stride-2 convolution of EfficientNet-Lite, the stem included) would train in
    float and be quantized only at export. Register such subclasses with the ``Conv2d`` wrapper."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_conv import _QuantConv2d
    from torch import nn

    for cls in {type(m) for m in net.modules() if isinstance(m, nn.Conv2d)}:
        if cls not in QuantModuleRegistry:
            mtq.register(original_cls=cls, quantized_cls=_QuantConv2d)


def _train(student: Any, x_u8: np.ndarray, labels: Optional[np.ndarray], targets: dict[bool, Any],
           normalize: Normalize, cfg: QATConfig, rng: np.random.Generator,
           progress: Optional[Callable[..., Any]]) -> list[float]:
    """Distillation through fake quantization: AdamW, cosine learning rate, seeded batches."""
    import torch
    import torch.nn.functional as F

    student.eval()  # folded BatchNorm has no statistics left; dropout off so the student sees what it exports
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    t = cfg.temperature
    losses: list[float] = []
    bar = progress(total=cfg.steps, desc="qat", unit="step") if progress else None
    try:
        for _ in range(cfg.steps):
            idx = rng.choice(len(x_u8), size=min(cfg.batch_size, len(x_u8)), replace=False)
            flip = bool(cfg.hflip and rng.random() < 0.5)
            logits = student(normalize(x_u8[idx], flip))
            teacher = targets[flip][idx]
            loss = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                            reduction="batchmean") * t * t
            if cfg.label_weight > 0 and y is not None:
                loss = loss + cfg.label_weight * F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) % LOG_EVERY == 0:
                log.info("QAT step %d/%d: loss %.4f", len(losses), cfg.steps, np.mean(losses[-LOG_EVERY:]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return losses


def _export(clean: Any, calib: np.ndarray, normalize: Normalize, p: Preprocess, target: str,
            batch: Optional[int], opset: int, quantize: bool,
            ) -> tuple[onnx.ModelProto, Optional[onnx.ModelProto], Optional[Quantization]]:
    """The fine-tuned float model -> fp32 ONNX -> (``quantize``) ONNX Runtime QDQ, minmax on the calibration
    images."""
    import torch

    from tledge_export.convert.onnx_export import export_onnx
    from tledge_export.int8.quantize import Quantizer

    with torch.no_grad():
        out = clean(normalize(calib[:1]))
        num_classes = int((out[0] if isinstance(out, tuple) else out).shape[1])
    fp32 = export_onnx(clean, p, num_classes, batch=batch, opset=opset)
    if not quantize:
        return fp32, None, None
    x_calib = np.concatenate([normalize(calib[i:i + TEACHER_BATCH]).numpy() for i in range(0, len(calib), TEACHER_BATCH)])
    with Quantizer(fp32, x_calib, target=target, method="minmax", fixed_batch=batch) as q:
        return fp32, q.quantize(), q.metadata()


@contextlib.contextmanager
def _quiet() -> Any:
    """ModelOpt prints ("Inserted 137 quantizers") on stdout, which carries the CLI's table and --json."""
    import warnings

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="modelopt")  # optional integrations it cannot find (transformers)
        yield
    if printed.getvalue().strip():
        log.debug("modelopt: %s", printed.getvalue().strip().replace("\n", " | "))


def _modelopt() -> Any:
    import warnings

    # Its import warns about optional integrations (transformers, CUDA) that int8 QAT of a CNN does not use.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ExportError(f"QAT needs NVIDIA Model Optimizer, which does not import ({e})",
                          hint="pip install 'tledge-export[qat]' (nvidia-modelopt)") from None
    finally:
        cpp_log.setLevel(level)
    return mtq


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY)
    except PackageNotFoundError:
        return "?"

