"""Accuracy-aware int8: a tight budget keeps the sensitive nodes in float until it holds, or fails clearly."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from tledge.data.folders import Splits
from tledge.data.imagecache import decode_images
from tledge.train.checkpoint import load_checkpoint, preprocess_of
from tledge_export import ExportConfig, export_model
from tledge_export.artifact import read_meta
from tledge_export.int8.accuracy_aware import search
from tledge_runtime.model.meta import ModelMeta, Provenance
from tledge_runtime.model.verification import Budget, Verification


class _OutlierFeature(torch.nn.Module):
    """The tiny run's classifier with one feature channel scaled x1000 before the head and the head's
    weights for it divided by 1000: the same function, but one activation channel 1000x wider than
    the rest. Per-tensor int8 activations then round every other feature to zero, the way outlier
    channels break int8 in real networks."""

    def __init__(self, net, channel: int = 7, factor: float = 1000.0):
        super().__init__()
        self.backbone = net.backbone
        self.head = copy.deepcopy(net.head)
        scale = torch.ones(self.head.in_features)
        scale[channel] = factor
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.head.weight[:, channel] /= factor

    def forward(self, x):
        return self.head(self.backbone(x) * self.scale)


def test_tight_budget_keeps_the_sensitive_nodes_in_float_and_meets_it(tiny_run, held_out, tmp_path):
    ckpt = load_checkpoint(tiny_run.best)
    prep = preprocess_of(ckpt)
    train = Splits.from_json((tiny_run.out / "split.json").read_text()).train
    calib = decode_images(train, prep, workers=2).images[::2]  # 17 images, every class: enough, and quick
    meta = ModelMeta(labels=held_out.meta_labels, preprocess=prep, provenance=Provenance(architecture="outlier"))
    result = export_model(_OutlierFeature(held_out.model).eval(), meta, verify_images=held_out.images,
                          verify_labels=held_out.labels, calib_images=calib,
                          config=ExportConfig(out=str(tmp_path), int8=True, budget=0.0, min_agreement=0.0))
    int8 = result.get("int8")
    aware = int8.details["accuracy_aware"]
    first, last = aware["attempts"][0], aware["attempts"][-1]
    assert not first["passed"] and first["accuracy_delta_points"] < 0  # all-int8 breaks
    assert int8.ok and aware["budget_met"] and last["passed"]
    assert 1 <= len(aware["float_nodes"]) <= aware["limit"]
    assert "/Mul" in aware["float_nodes"]  # the node that reads the wide channel ranks first
    meta = read_meta(tmp_path / "model.int8.onnx")
    assert meta.quantization.float_nodes == tuple(aware["float_nodes"])
    assert meta.verification.passed and meta.verification.accuracy_delta_points == 0.0
    # The kept nodes really are float: none of their weights is dequantized from int8.
    model = onnx.load(str(tmp_path / "model.int8.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    kept = [n for n in model.graph.node if n.name in aware["float_nodes"]]
    assert len(kept) == len(aware["float_nodes"])
    for node in kept:
        for name in node.input:
            dq = producer.get(name)
            assert dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits, (node.name, name)
    assert aware["cpu_latency_ms_batch1"]["chosen"] > 0


def _parity(passed: bool, delta: float) -> Verification:
    return Verification(images=10, max_abs_diff=0.1, mean_abs_diff=0.01, agreement=1.0 + delta / 100, accuracy_reference=1.0,
                  accuracy=1.0 + delta / 100, budget=Budget.accuracy(0.5), passed=passed)


@pytest.mark.parametrize("needed, limit, tried, chosen", [
    (5, None, [0, 1, 2, 4, 8, 6, 5], 5),  # doubling overshoots to 8, bisection comes back to 5
    (3, 3, [0, 1, 2, 3], 3),  # the limit is tried exactly
    (9, 4, [0, 1, 2, 4], None),  # never within budget: the closest miss is reported
    (1, 0, [0], None),  # 0 turns the search off
])
def test_search_doubles_then_bisects_to_the_fewest_float_nodes(needed, limit, tried, chosen):
    ranking = [(f"n{i}", 1.0 / (i + 1)) for i in range(40)]
    calls: list[int] = []

    def quantize(float_nodes):
        calls.append(len(float_nodes))
        model = onnx.ModelProto()
        model.doc_string = str(len(float_nodes))
        return model

    def evaluate(model):
        k = int(model.doc_string)
        return _parity(k >= needed, delta=-max(0, needed - k)), 1.0 + k

    found = search(quantize, evaluate, lambda model: ranking, max_float_nodes=limit)
    assert calls == tried
    if chosen is None:
        assert not found.met
    else:
        assert found.met and found.float_nodes == tuple(f"n{i}" for i in range(chosen))


def test_agreement_is_part_of_the_budget():
    """Accuracy can hide answers that changed in both directions; the agreement floor cannot."""
    import numpy as np

    from tledge_export.verify.compare import compare

    labels = np.array([0, 1, 0, 1])
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])  # PyTorch: 2 of 4 right
    swapped = np.array([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])  # every answer changed, still 2 of 4
    lenient = compare(swapped, reference, labels, Budget.accuracy(0.0))
    strict = compare(swapped, reference, labels, Budget.accuracy(0.0, min_agreement=99.0))
    assert lenient.passed and lenient.accuracy == strict.accuracy_reference
    # every answer changed: no image is decided beyond this "noise", which is itself the refusal
    assert not strict.passed and "numerical noise" in strict.failures[0] and "0 of 4 images decided" in strict.failures[0]


def test_the_hint_after_a_missed_qat_names_only_what_was_tried():
    """--qat on skips post-training int8: the hint must not say it ran; after --qat auto it names both."""
    from tledge_export.steps import budget_hint

    v = Verification(images=852, max_abs_diff=0.5, mean_abs_diff=0.1, agreement=0.987, accuracy_reference=0.87,
                     accuracy=0.868, budget=Budget(kind="accuracy"), passed=False)
    qat_only = budget_hint("int8", v, {"qat": {"steps": 113}, "accuracy_aware": {"limit": 21},
                                       "quantization": {"method": "minmax"}})
    assert qat_only.startswith("quantization-aware training (113 steps, then up to 21 node(s) kept in float) missed")
    assert "post-training" not in qat_only and "--calib-method entropy or percentile" in qat_only
    both = budget_hint("int8", v, {"qat": {"steps": 38}, "post_training": {"limit": 16},
                                   "accuracy_aware": {"limit": 21}, "quantization": {"method": "minmax"}})
    assert both.startswith("post-training int8 (up to 16 node(s) kept in float) and quantization-aware training")


def test_a_search_that_never_meets_the_budget_reports_the_closest_miss():
    """Closest = fewest failed checks, then the most answers kept: here the all-int8 model (one failed check,
    98.8% agreement) beats candidates with float nodes and higher accuracy but lower agreement (an ELPV Lite2
    export reported a 98.4% candidate while all-int8 had reached 98.8%)."""
    agreement = {0: 0.988, 1: 0.986, 2: 0.984, 4: 0.985}
    accuracy = {0: 0.86, 1: 0.865, 2: 0.87, 4: 0.868}

    def quantize(float_nodes):
        model = onnx.ModelProto()
        model.doc_string = str(len(float_nodes))
        return model

    def evaluate(model):
        k = int(model.doc_string)
        return Verification(images=852, max_abs_diff=0.5, mean_abs_diff=0.1, agreement=agreement[k],
                            accuracy_reference=0.87, accuracy=accuracy[k], budget=Budget.accuracy(1.0), passed=False,
                            failures=("agreement",)), 1.0

    found = search(quantize, evaluate, lambda model: [(f"n{i}", 1.0) for i in range(10)], max_float_nodes=4)
    assert not found.met and found.float_nodes == () and found.parity.agreement == 0.988

