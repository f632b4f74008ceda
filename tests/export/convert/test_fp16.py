"""fp16: float32 I/O, within its 0.1-point budget, and float32 kept where the data would overflow fp16."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tledge_export.convert.fp16 import FP16_SAFE_MAX, convert_fp16, fp16_unsafe_nodes
from tledge_export.convert.onnx_export import export_onnx
from tledge_runtime.model.meta import Preprocess


def test_fp16_file_has_float32_io_and_agrees_with_pytorch(exported, held_out):
    path = exported.out / "model.fp16.onnx"
    model = onnx.load(str(path))
    f32 = onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    types = {t.data_type for t in model.graph.initializer if t.name in conv_weights}
    assert types == {onnx.TensorProto.FLOAT16}
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": held_out.x})[0]
    assert (logits.argmax(1) == held_out.logits.argmax(1)).all()
    assert np.abs(logits - held_out.logits).max() < 0.05  # fp16 rounding, not a different model
    result = exported.get("fp16")
    assert result.parity.budget.max_drop_points == 0.1 and result.parity.passed
    # The head's pooling stays float32 by op type (a mean over the whole feature map).
    assert any("GlobalAveragePool" in n for n in result.details["fp32_nodes"])


class _Loud(torch.nn.Module):
    """A block whose intermediate tensor reaches ~1e6 (fp16 overflows at 65504) though its output is small."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        loud = self.conv(x) * 1e6 + 3e5
        quiet = loud * 1e-6
        return self.head(quiet.mean((2, 3)))


def test_nodes_whose_tensors_overflow_fp16_stay_float32():
    prep = Preprocess(height=8, width=8)
    model = _Loud().eval()
    x = torch.randn(6, 3, 8, 8)
    ref = model(x).detach().numpy()
    fp32 = export_onnx(model, prep, 3)
    unsafe = fp16_unsafe_nodes(fp32, x.numpy())
    assert unsafe, f"nothing above {FP16_SAFE_MAX} found"
    plain = convert_fp16(fp32)  # what a converter without the range check writes
    careful = convert_fp16(fp32, fp32_nodes=unsafe)
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0]

    assert not np.isfinite(run(plain)).all() or np.abs(run(plain) - ref).max() > 0.1
    np.testing.assert_allclose(run(careful), ref, atol=0.05)
