"""Tiny real ONNX classifiers and real image pictures for the runtime tests, built in the tests.

Every model is ``GlobalAveragePool -> Flatten -> Gemm`` over the normalized input,
with the Gemm weights set to a scaled identity: the logit of class c is the mean
normalized value of channel c. So a mostly red image is "red", a mostly green one
"green", a mostly blue one "blue" - predictions are known without training.

Variants: fp32 (float NCHW), fp16 (float16 end to end), baked (uint8 NHWC input,
normalization inside the graph), probabilities (a Softmax at the end), and fixed
batch. ``write_model`` also makes broken ones (missing/newer metadata, graphs
that contradict their metadata) for the error tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tledge_runtime.model.meta import ONNX_KEY, InputSpec, ModelMeta, OutputSpec, Preprocess, Provenance

LABELS = ("red", "green", "blue")
SIZE = 16
COLOURS = {"red": (220, 30, 40), "green": (30, 200, 50), "blue": (40, 50, 210)}


def make_meta(variant: str = "fp32", *, labels: tuple[str, ...] = LABELS, size: int = SIZE,
              batch: int | None = None, output_kind: str = "logits") -> ModelMeta:
    """The metadata tledge export would write for one of the test graphs."""
    baked = variant == "baked"
    return ModelMeta(
        labels=labels,
        preprocess=Preprocess(height=size, width=size, resize="crop", crop_ratio=0.875),
        provenance=Provenance(architecture="tiny-gap-gemm", opset=17),
        input=InputSpec(name="input", layout="NHWC" if baked else "NCHW",
                        dtype={"fp32": "float32", "fp16": "float16", "baked": "uint8"}[variant],
                        batch=batch, baked_preprocess=baked),
        output=OutputSpec(name="logits", kind=output_kind),
        precision="fp16" if variant == "fp16" else "fp32",
    )


def build_graph(variant: str = "fp32", *, size: int = SIZE, classes: int = 3, channels: int = 3,
                batch: int | None = None, probabilities: bool = False, input_name: str = "input",
                pooled_output: bool = False, ood: bool = False) -> onnx.ModelProto:
    """The ONNX graph of a colour classifier; ``classes``/``channels`` other than 3 make mismatched graphs.

    ``pooled_output`` stops after the pooling: an (N, C, 1, 1) output, wrong for a classifier. ``ood`` adds a second
    output ``ood_score``: minus the spread of the image's mean channel values (a grey or noise frame is "unknown").
    """
    fdt = np.float16 if variant == "fp16" else np.float32
    tdt = TensorProto.FLOAT16 if variant == "fp16" else TensorProto.FLOAT
    n: Any = batch if batch is not None else "batch"
    weights = np.zeros((channels, classes), dtype=fdt)
    for i in range(min(channels, classes)):
        weights[i, i] = 1.0  # logit of class c = mean normalized value of channel c
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.zeros(classes, fdt), "B")]
    nodes = []
    if variant == "baked":
        p = Preprocess(height=size, width=size)
        std = np.asarray(p.std, dtype=np.float64)
        inits += [numpy_helper.from_array((p.scale / std).astype(np.float32), "mul"),
                  numpy_helper.from_array((-np.asarray(p.mean) / std).astype(np.float32), "add")]
        x = helper.make_tensor_value_info(input_name, TensorProto.UINT8, [n, size, size, channels])
        nodes += [helper.make_node("Cast", [input_name], ["xf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["xf", "mul"], ["xm"]),
                  helper.make_node("Add", ["xm", "add"], ["xn"]),
                  helper.make_node("Transpose", ["xn"], ["nchw"], perm=[0, 3, 1, 2])]
        pooled_in = "nchw"
    else:
        x = helper.make_tensor_value_info(input_name, tdt, [n, channels, size, size])
        pooled_in = input_name
    if pooled_output:
        nodes.append(helper.make_node("GlobalAveragePool", [pooled_in], ["logits"]))
        y = helper.make_tensor_value_info("logits", tdt, [n, channels, 1, 1])
        return _finish(helper.make_graph(nodes, "pooled", [x], [y], inits[2:]))
    nodes += [helper.make_node("GlobalAveragePool", [pooled_in], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"])]
    if probabilities:
        nodes += [helper.make_node("Gemm", ["flat", "W", "B"], ["z"]),
                  helper.make_node("Softmax", ["z"], ["logits"], axis=1)]
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", tdt, [n, classes])]
    if ood:  # "unknown" = colourless: minus the spread of the mean channel values (a grey frame scores ~0)
        nodes += [helper.make_node("ReduceMax", ["flat"], ["top"], keepdims=1, axes=[1]),
                  helper.make_node("ReduceMin", ["flat"], ["low"], keepdims=1, axes=[1]),
                  helper.make_node("Sub", ["low", "top"], ["ood_score"])]
        outputs.append(helper.make_tensor_value_info("ood_score", tdt, [n, 1]))
    return _finish(helper.make_graph(nodes, "colour", [x], outputs, inits))


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.15
    onnx.checker.check_model(model)
    return model


def write_model(path: Path, variant: str = "fp32", *, meta: ModelMeta | None = None, meta_json: str | None = None,
                no_meta: bool = False, graph: onnx.ModelProto | None = None, **meta_kwargs: Any) -> Path:
    """Write a test model: a graph plus its metadata (or deliberately wrong/missing metadata)."""
    model = graph if graph is not None else build_graph(
        variant, batch=meta_kwargs.get("batch"), probabilities=meta_kwargs.get("output_kind") == "probabilities")
    del model.metadata_props[:]
    if not no_meta:
        text = meta_json if meta_json is not None else (meta or make_meta(variant, **meta_kwargs)).to_json()
        model.metadata_props.append(onnx.StringStringEntryProto(key=ONNX_KEY, value=text))
    onnx.save(model, str(path))
    return path


def meta_dict(**changes: Any) -> dict:
    """The fp32 test metadata as a dict, with top-level fields changed (for newer/garbled documents)."""
    d = json.loads(make_meta().to_json())
    d.update(changes)
    return d


def colour_image(name: str, seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """An HxWx3 uint8 RGB picture dominated by one colour, with noise so every file differs."""
    rng = np.random.default_rng(seed)
    base = np.asarray(COLOURS[name], dtype=np.int16)
    noise = rng.integers(-30, 31, size=(size[1], size[0], 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def build_engine_plan(onnx_path: Path, *, max_batch: int = 8, size: int = SIZE) -> bytes:
    """A real serialized TensorRT engine for a test graph, built with whichever TensorRT is installed.

    TensorRT for RTX builds ahead of time without a GPU when told which GPU to target;
    regular TensorRT needs the GPU it builds for.
    """
    from tledge_runtime.backends.nvidia import cuda_device_count, import_tensorrt

    trt = import_tensorrt().module
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10+: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        raise RuntimeError("TensorRT cannot parse the test graph: " + str(parser.get_error(0)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, size, size), (max(1, max_batch // 2), 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    if not cuda_device_count() and hasattr(config, "set_compute_capability"):
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the test engine")
    return bytes(plan)


def write_int8_model(path: Path, fp32_path: Path, *, target: str = "cpu") -> Path:
    """Quantize a test graph with onnxruntime's static QDQ quantizer, calibrated on colour images.

    ``target="cpu"``: u8 activations / s8 weights (fast on x86 and ARM CPUs);
    ``"tensorrt"``: symmetric s8 activations and weights, as TensorRT requires.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from tledge_runtime.image.preprocess import Normalizer, prepare_image
    from tledge_runtime.model.meta import Quantization

    p = make_meta().preprocess
    batches = [Normalizer(p)(prepare_image(colour_image(name, seed=200 + i), p)[None])
               for i, name in enumerate(LABELS * 4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter({"input": b} for b in batches)

        def get_next(self):  # noqa: ANN202 - onnxruntime's interface
            return next(self._it, None)

    model = onnx.load(str(fp32_path))
    del model.metadata_props[:]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        onnx.save(model, str(plain))
        activation = QuantType.QUInt8 if target == "cpu" else QuantType.QInt8
        quantize_static(str(plain), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                        activation_type=activation, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": target == "tensorrt", "WeightSymmetric": True})
    quant = Quantization(target=target, method="minmax", calibration_images=len(batches),
                         activation_type="uint8" if target == "cpu" else "int8", per_channel=False)
    meta = make_meta().with_(precision="int8", quantization=quant)
    return write_model(path, graph=onnx.load(str(path)), meta=meta)


def write_answered_model(path: Path, *, threshold: float = -0.5, set_threshold: float = 0.5) -> Path:
    """A colour model that carries answers: prediction sets (LAC at ``set_threshold``) and "unknown" (an image
    whose channel means spread less than ``-threshold`` normalized units, such as a grey frame)."""
    from dataclasses import replace

    answers = answers_of_colour_model(threshold=threshold, set_threshold=set_threshold)
    return write_model(path, graph=build_graph(ood=True), meta=replace(make_meta(), answers=answers))


def answers_of_colour_model(*, threshold: float = -0.5, set_threshold: float = 0.5):
    """The answers :func:`write_answered_model` stores: LAC sets at ``set_threshold``, "unknown" at ``threshold``."""
    from tledge_runtime.model.answers import OOD, Answers, Conformal

    return Answers(conformal=Conformal("lac", 0.95, set_threshold, 100, "test"),
                   ood=OOD("mahalanobis", "ood_score", threshold, 0.95, "test"))
