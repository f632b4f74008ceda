"""Issue 20 end to end: a run fits calibration, prediction sets and "unknown" on its own held-out data, every
export carries them (the score as a second graph output at every precision), the device answers with them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from tledge.cli.main import main


def test_the_run_fits_all_three_on_held_out_data(answered_run):
    a = answered_run.metrics["answers"]
    assert a["unfitted"] == [] and 0.01 <= a["temperature"] <= 100 and "val split, 36 images" in a["calibration"]
    assert a["conformal"]["score"] == "lac" and a["conformal"]["coverage"] == 0.95 and a["conformal"]["images"] == 36
    assert a["ood"]["method"] == "mahalanobis" and a["ood"]["output"] == "ood_score" and a["ood"]["keep"] == 0.95
    report = a["calibration_fit"]["test"]
    assert set(report) >= {"ece_before", "ece_after", "nll_before", "nll_after"} and report["images"] == 36
    assert 0 <= a["conformal"]["test"]["coverage"] <= 1 and 0 < a["conformal"]["test"]["mean_set_size"] <= 3
    assert (answered_run.out / "calibration.png").stat().st_size > 1000
    ckpt = torch.load(answered_run.best, weights_only=True)
    assert ckpt["ood"]["method"] == "mahalanobis" and set(ckpt["ood"]["arrays"]) == {"project", "mean", "centres"}


def test_every_precision_carries_the_score_output_and_verifies_it(answered_export):
    for fmt in ("fp32", "fp16", "int8"):
        result = answered_export.get(fmt)
        if fmt == "int8" and not result.ok:  # a 32-px model trained 4 epochs on 60 images: its int8 features move
            assert "ood_score" in result.message or "unknown" in result.message  # the score, and the gate says so
            continue
        assert result.ok, result.message
        model = onnx.load(str(result.path))
        assert [o.name for o in model.graph.output] == ["logits", "ood_score"]
        v = result.parity
        assert v.unknown_images == 72 + 24 and v.ood_max_abs_diff is not None  # held-out (val + test) + probes
        if fmt != "fp32":  # "unknown" alike on the images decided beyond the format's noise (the gate): passed
            assert v.unknown_threshold == answered_export.get("fp32").parity.unknown_threshold and 0.9 <= v.unknown_agreement
    int8 = answered_export.get("int8")
    if int8.ok:
        ood_nodes = [n for n in onnx.load(str(int8.path)).graph.node if n.name.startswith("/ood/")]
        assert ood_nodes and all(n.op_type not in ("QuantizeLinear", "DequantizeLinear") for n in ood_nodes)


def test_the_device_answers_with_candidates_and_unknown(answered_run, answered_export):
    from tledge.data.folders import Splits
    from tledge_runtime import Classifier

    test = Splits.from_json((answered_run.out / "split.json").read_text()).test
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt in [f for f in ("fp32", "fp16", "int8") if answered_export.get(f).ok]:
        for backend in ("ort-cpu", "openvino"):
            with Classifier(answered_export.get(fmt).path, backend=backend) as clf:
                inside = clf.predict_batch([str(s.path) for s in test])
                outside = clf.predict_batch([noise, np.full((40, 40, 3), 0, np.uint8), np.full((40, 40, 3), 255, np.uint8)])
            assert all(p.candidates is not None and p.label in p.candidates or p.unsure for p in inside)
            assert sum(p.unknown for p in inside) <= 0.2 * len(inside), (fmt, backend)
            assert sum(p.unknown for p in outside) >= 2, (fmt, backend, outside)  # a 32-px model trained 4 epochs
            assert min(p.ood_score for p in outside) > np.median([p.ood_score for p in inside])
            assert all(isinstance(p.ood_score, float) for p in inside + outside)


def test_the_runtime_cli_says_unknown_with_the_nearest_label(answered_export, tmp_path):
    from PIL import Image

    from tledge_runtime.cli import main as runtime

    frame = tmp_path / "lens-cap.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(frame)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert runtime(["-q", "predict", str(answered_export.get("fp16").path), str(frame)]) == 0
    assert "unknown (nearest: " in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert runtime(["-q", "predict", str(answered_export.get("fp32").path), str(frame), "--json"]) == 0
    record = json.loads(out.getvalue())
    assert record["unknown"] is True and isinstance(record["ood_score"], float) and isinstance(record["candidates"], list)


def test_a_run_from_before_gets_all_three_at_export(answered_run, tmp_path):
    import shutil

    from tledge.train.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "old"
    shutil.copytree(answered_run.out, run, ignore=shutil.ignore_patterns("export", "*.png"))
    ckpt = load_checkpoint(run / "best.pt")
    save_checkpoint(run / "best.pt", {k: v for k, v in ckpt.items() if k not in ("answers", "ood", "format",
                                                                                 "format_version")})
    result = CliRunner().invoke(main, ["export", str(run / "best.pt"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    meta = json.loads({p.key: p.value for p in onnx.load(str(run / "export" / "model.onnx")).metadata_props}["tledge"])
    assert meta["answers"]["conformal"]["coverage"] == 0.95 and meta["answers"]["ood"]["method"] == "mahalanobis"
    assert "fitting calibration, prediction sets and 'unknown'" in result.output


def test_too_few_held_out_images_are_said_and_marked_not_defaulted(tiny_run, tmp_path):
    from tledge.exporting import export_checkpoint
    from tledge_export import ExportConfig
    from tledge_runtime import Classifier

    notes = tiny_run.metrics["answers"]["unfitted"]
    assert any(n.startswith("calibration: only 6 validation images") for n in notes)
    assert any(n.startswith("conformal sets: only 6") for n in notes) and any(n.startswith("unknown:") for n in notes)
    exported = export_checkpoint(tiny_run.best, ExportConfig(out=str(tmp_path / "export")), workers=2)
    with Classifier(exported.get("fp32").path) as clf:
        assert list(clf.meta.answers.unfitted) == notes and clf.meta.answers.ood is None
        p = clf.predict(np.zeros((40, 40, 3), np.uint8))
    assert p.unknown is None and p.candidates is None and "unknown" not in p.to_dict()


@pytest.mark.parametrize("args, words", [
    (["finetune", "DATA", "--coverage", "1.5"], "--coverage"), (["finetune", "DATA", "--ood-keep", "0"], "--ood-keep"),
    (["export", "CKPT", "--coverage", "0"], "--coverage"), (["export", "CKPT", "--ood-keep", "1"], "--ood-keep"),
])
def test_targets_outside_zero_one_are_usage_errors(tiny_run, args, words):
    argv = [str(tiny_run.metrics["config"]["data"]) if a == "DATA" else str(tiny_run.best) if a == "CKPT" else a
            for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
