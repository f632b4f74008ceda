"""Quantization-aware int8 (tledge_export.int8.qat): a tiny real CNN, fine-tuned through NVIDIA ModelOpt's fake
quantization on synthetic images, comes back as a QDQ graph of the asked flavour that ONNX Runtime runs
and that agrees with the fp32 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from tledge_export.errors import ExportError
from tledge_runtime.image.preprocess import Normalizer
from tledge_runtime.model.meta import Preprocess

pytest.importorskip("modelopt")  # nvidia-modelopt: tledge-export[qat]; its quantization package loads in qat_int8
from tledge_export.int8.qat import QATConfig, qat_int8
from tledge_export.int8.qat_fold import fold_batchnorm

SIZE = 32
COLOURS = ((200, 40, 40), (40, 190, 60), (40, 60, 200))  # one class per dominant colour
PREP = Preprocess(height=SIZE, width=SIZE, resize="crop", crop_ratio=1.0, interpolation="bilinear",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class _Block(nn.Module):
    """An inverted residual (expand, depthwise, project, add), as in EfficientNet-Lite / MobileNetV2."""

    def __init__(self, c: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False),
                                nn.BatchNorm2d(2 * c), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class _PaddedConv(nn.Conv2d):
    """A Conv2d subclass, as timm's Conv2dSame (EfficientNet-Lite's stride-2 convolutions) is."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_PaddedConv(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = _Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.dropout(torch.flatten(self.pool(self.block(self.stem(x))), 1)))


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = np.array(COLOURS, dtype=np.float64)[labels] * rng.uniform(0.7, 1.0, (n, 1))
    pixels = base[:, None, None, :] + rng.normal(0, 25, (n, SIZE, SIZE, 3))
    return pixels.clip(0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def trained():
    """The tiny net trained for a few steps (BatchNorm statistics included), and held-out images with its logits."""
    torch.manual_seed(0)
    net = _TinyNet()
    x_u8, y = _images(96, seed=1)
    x = torch.from_numpy(Normalizer(PREP)(x_u8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(30):
        idx = torch.arange(step * 16, step * 16 + 16) % len(x)
        loss = nn.functional.cross_entropy(net(x[idx]), torch.from_numpy(y)[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    held_u8, held_y = _images(60, seed=2)
    held_x = Normalizer(PREP)(held_u8)
    with torch.no_grad():
        ref = net(torch.from_numpy(held_x)).numpy()
    assert (ref.argmax(1) == held_y).mean() > 0.9  # a real classifier, not noise
    return net, x_u8, y, held_x, held_y, ref


@pytest.fixture(scope="module", params=["cpu", "tensorrt"])
def qat(request, trained):
    net, x_u8, y, *_ = trained
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = qat_int8(net, x_u8, PREP, labels=y, config=QATConfig(target=request.param, steps=12, batch_size=16,
                                                                   lr=1e-4, calibration_images=32))
    for k, v in net.state_dict().items():  # the teacher is left as it was
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    return request.param, result


def _graph(model: onnx.ModelProto):
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    return inits, nodes, [n for n in nodes if n.op_type == "QuantizeLinear"], [n for n in nodes if n.op_type == "DequantizeLinear"]


def test_qdq_graph_of_the_asked_flavour(qat):
    target, result = qat
    inits, nodes, quant, dequant = _graph(result.model)
    assert not [n for n in nodes if n.op_type == "BatchNormalization"]  # folded before quantization
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert len(convs) == 4 and len(quant) >= 6
    by_output = {n.output[0]: n for n in dequant}
    for conv in convs:  # every convolution: quantized input, int8 per-channel symmetric weights
        assert conv.input[0] in by_output, f"{conv.name}: input not quantized"
        w_dq = by_output[conv.input[1]]
        w = inits[w_dq.input[0]]
        assert w.data_type == TensorProto.INT8
        assert numpy_helper.to_array(inits[w_dq.input[1]]).shape == (w.dims[0],)
        assert not numpy_helper.to_array(inits[w_dq.input[2]]).any()
    zero_points = [inits[q.input[2]] for q in quant]
    biases = [inits[d.input[0]].data_type for d in dequant if d.input[0] in inits]
    if target == "cpu":
        assert all(z.data_type == TensorProto.UINT8 for z in zero_points)
        assert TensorProto.INT32 in biases  # ORT's CPU kernels take int32 biases
    else:
        assert all(z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any() for z in zero_points)
        assert TensorProto.INT32 not in biases  # TensorRT's parser rejects int32 bias DequantizeLinear
    gemm = next(n for n in nodes if n.op_type == "Gemm")
    assert gemm.output[0] == result.model.graph.output[0].name  # logits stay float
    q = result.quantization
    assert (q.target, q.method, q.activation_type, q.weight_type, q.per_channel, q.calibration_images) == (
        target, "qat", "uint8" if target == "cpu" else "int8", "int8", True, 32)
    d = result.details
    assert d["library"].startswith("nvidia-modelopt ") and d["steps"] == 12 and d["folded_batchnorms"] == 4
    assert d["quantizers"]["weights"] == 5 and d["quantizers"]["activations"] >= 5
    assert d["temperature"] == 2.0 and "KL" in d["distillation"] and d["seconds"] > 0


def test_int8_runs_in_onnxruntime_and_agrees_with_fp32(qat, trained):
    _, result = qat
    *_, held_x, _, ref = trained
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": held_x})[0]
    assert logits.shape == ref.shape and np.isfinite(logits).all()
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(logits - ref).max() < 0.5 * np.abs(ref).max()


@pytest.mark.tensorrt
@pytest.mark.parametrize("qat", ["tensorrt"], indirect=True)  # the CPU flavour's int32 biases are for ORT only
def test_tensorrt_flavour_passes_the_rtx_parser_and_builder(qat):
    pytest.importorskip("tensorrt_rtx_bindings")
    from tledge_runtime.backends.trt_build import check_onnx

    _, result = qat
    assert "parsed, built" in check_onnx(result.model.SerializeToString(), input_name="input",
                                         sample_shape=(3, SIZE, SIZE), max_batch=4)


def test_fold_batchnorm_keeps_the_logits(trained):
    import copy

    net, x_u8, *_ = trained
    folded = copy.deepcopy(net)
    x = torch.from_numpy(Normalizer(PREP)(x_u8[:8]))
    assert fold_batchnorm(folded, x) == 4
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_export_errors(trained):
    net, x_u8, *_ = trained
    with pytest.raises(ExportError, match="expected uint8"):
        qat_int8(net, x_u8[:, :16], PREP)
    with pytest.raises(ExportError, match="one label per training image"):
        qat_int8(net, x_u8, PREP, config=QATConfig(label_weight=1.0))
    with pytest.raises(ExportError, match="unknown int8 target"):
        qat_int8(net, x_u8, PREP, config=QATConfig(target="gpu"))
