"""Every option the README and --help document, run end to end on tiny real data: each one changes what it says."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tledge.cli.main import main
from tledge_runtime import Classifier
from tledge_runtime.backends.loader import read_meta

from ...datasets import make_dataset


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def test_optimizer_unfreeze_train_bn_ema_and_no_hflip(tmp_path):
    from tledge.models import create_model, get_arch

    data = make_dataset(tmp_path / "data", per_class=10)
    out = tmp_path / "run"
    _invoke(["finetune", str(data), "--out", str(out), "--img-size", "32", "--epochs", "2", "--freeze-epochs", "1",
             "--optimizer", "sgd", "--unfreeze", "1", "--train-bn", "--no-hflip", "--batch-size", "8",
             "--ema", "0.9", "--workers", "2"])
    last = torch.load(out / "last.pt", weights_only=True)
    steps = last["state"]["step"]
    assert last["config"]["ema"] == 0.9 and last["ema"]["updates"] == steps > 0  # one update per optimizer step
    head = "head.weight"
    assert not torch.equal(last["ema"]["weights"][head], last["state_dict"][head])  # the average, not the last step
    assert last["config"]["optimizer"] == "sgd" and last["config"]["train_bn"] and last["config"]["unfreeze"] == 1
    assert all("momentum_buffer" in s for s in last["optimizer"]["state"].values())  # SGD's state, not AdamW's
    assert json.loads((out / "metrics.json").read_text())["hflip"] is False
    trained = {k.removeprefix("backbone."): v for k, v in last["state_dict"].items() if k.startswith("backbone.")}
    imagenet = create_model("efficientnet_lite0", 3, "imagenet").backbone.state_dict()
    last_stage = get_arch("efficientnet_lite0").stages[-1]
    conv_weights = [k for k in imagenet if k.endswith("weight") and imagenet[k].ndim == 4]
    in_last = [k for k in conv_weights if k.startswith(last_stage)]
    assert in_last and all(not torch.equal(trained[k], imagenet[k]) for k in in_last)
    assert all(torch.equal(trained[k], imagenet[k]) for k in conv_weights if k not in in_last)
    # --train-bn: BatchNorm statistics moved while fine-tuning (they stay put without it)
    means = [k for k in imagenet if k.endswith("running_mean")]
    assert any(not torch.equal(trained[k], imagenet[k]) for k in means)


def _arrows(folder, n: int) -> None:
    """Two classes that are each other's mirror image: a bright left half, or a bright right half."""
    rng = np.random.default_rng(0)
    for name, side in (("left", slice(0, 20)), ("right", slice(20, 40))):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            a[:, side] += 150
            Image.fromarray(a).save(folder / name / f"{i}.png")


def test_hflip_auto_turns_mirroring_off_when_the_mirror_is_another_class(tmp_path):
    data = tmp_path / "arrows"
    _arrows(data, 16)
    out = tmp_path / "run"
    _invoke(["finetune", str(data), "--out", str(out), "--img-size", "32", "--epochs", "2", "--freeze-epochs", "2",
             "--workers", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hflip"] is False and metrics["config"]["hflip"] is None  # auto decided: off
    log = (out / "train.log").read_text()
    assert "hflip auto: off" in log
    assert torch.load(out / "best.pt", weights_only=True)["hflip"] is False  # the decision travels with the weights
    # ... to quantization-aware training, which then does not train on mirrored images either
    pytest.importorskip("modelopt")
    result = _invoke(["export", str(out / "best.pt"), "--out", str(tmp_path / "qat"), "--int8", "--qat", "on",
                      "--qat-epochs", "1", "--calib-size", "16", "--budget", "100", "--min-agreement", "0", "--json",
                      "--workers", "2"])
    int8 = next(f for f in json.loads(result.stdout)["formats"] if f["format"] == "int8")
    assert int8["qat"]["hflip"] is False


def test_orientation_auto_keeps_every_change_for_symmetric_classes(tiny_run, tmp_path):
    assert tiny_run.metrics["hflip"] is True  # the shared tiny run pins vflip and rot90 off (tests/datasets.py)
    # colour does not care which way up: flips and rotations all help or tie, so all are on
    data, out = make_dataset(tmp_path / "data", per_class=16), tmp_path / "run"
    _invoke(["finetune", str(data), "--out", str(out), "--img-size", "32", "--epochs", "2", "--freeze-epochs", "2",
             "--workers", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["hflip"], metrics["vflip"], metrics["rot90"]) == (True, True, True)


def _patterns(folder, n: int, classes: dict) -> None:
    """Noisy 40x40 images of each class's pattern (a boolean mask of bright pixels)."""
    rng = np.random.default_rng(1)
    for name, mask in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            a[mask] += 150
            Image.fromarray(a).save(folder / name / f"{i}.png")


def _orientations_decided(tmp_path, classes: dict) -> tuple[dict, str]:
    data, out = tmp_path / "data", tmp_path / "run"
    _patterns(data, 16, classes)
    _invoke(["finetune", str(data), "--out", str(out), "--img-size", "32", "--epochs", "2", "--freeze-epochs", "2",
             "--workers", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics["config"][k] for k in ("hflip", "vflip", "rot90")} == dict.fromkeys(("hflip", "vflip", "rot90"))
    assert {k: torch.load(out / "best.pt", weights_only=True)[k] for k in ("hflip", "vflip", "rot90")} == \
        {k: metrics[k] for k in ("hflip", "vflip", "rot90")}  # the decisions travel with the weights
    return metrics, (out / "train.log").read_text()


def test_vflip_auto_is_off_when_upside_down_is_another_class(tmp_path):
    rows = np.arange(40)[:, None] < 20
    metrics, log = _orientations_decided(tmp_path, {"top": np.broadcast_to(rows, (40, 40)),
                                                    "bottom": np.broadcast_to(~rows, (40, 40))})
    assert metrics["hflip"] is True and metrics["vflip"] is False
    assert "vflip auto: off (a head trained on vertically flipped training images: 0.00%" in log


def test_rot90_auto_is_off_when_a_quarter_turn_is_another_class(tmp_path):
    stripes = (np.arange(40) // 4) % 2 == 0
    metrics, log = _orientations_decided(tmp_path, {"rows": np.broadcast_to(stripes[:, None], (40, 40)),
                                                    "columns": np.broadcast_to(stripes[None, :], (40, 40))})
    assert metrics["hflip"] is True and metrics["vflip"] is True and metrics["rot90"] is False
    assert "rot90 auto: off" in log


def test_orientation_options_override_auto(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    _invoke(["finetune", str(data), "--out", str(out), "--img-size", "32", "--epochs", "2", "--freeze-epochs", "1",
             "--no-vflip", "--rot90", "--workers", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["vflip"], metrics["rot90"]) == (False, True)
    assert "vflip auto" not in (out / "train.log").read_text()


def test_export_options_fp16_io_entropy_calibration_size_class_budget_reference_count(tiny_run, tmp_path):
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(tiny_run.best), "--out", str(out), "--fp16", "--fp16-io",
                                       "--int8", "--calib-method", "entropy", "--calib-size", "9",
                                       "--max-class-drop", "100", "--reference-images", "3", "--budget", "100",
                                       "--min-agreement", "0", "--json", "--workers", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    formats = {f["format"]: f for f in report["formats"]}
    assert report["images"]["calibration"] == 9
    assert formats["int8"]["quantization"]["method"] == "entropy"
    assert formats["int8"]["verification"]["budget"]["max_class_drop_points"] == 100
    fp16 = read_meta(out / "model.fp16.onnx")
    assert fp16.input.dtype == "float16" and fp16.reference_set.images == 3
    graph = onnx.load(str(out / "model.fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    with Classifier(out / "model.fp16.onnx") as clf:  # the runtime feeds float16 to an fp16-I/O model
        assert clf.predict(np.full((40, 40, 3), (200, 40, 40), np.uint8)).label == "red"


@pytest.mark.slow
def test_dynamo_exporter_through_the_whole_pipeline(tiny_run, tmp_path):
    out = tmp_path / "export"
    _invoke(["export", str(tiny_run.best), "--out", str(out), "--exporter", "dynamo", "--fp16", "--int8",
             "--target", "tensorrt", "--budget", "100", "--min-agreement", "0", "--workers", "2"])
    for name in ("model.onnx", "model.fp16.onnx", "model.int8-trt.onnx"):
        assert read_meta(out / name).verification.passed
    pytest.importorskip("tensorrt_rtx_bindings")
    from tledge_runtime.backends.trt_build import check_onnx

    for name in ("model.fp16.onnx", "model.int8-trt.onnx"):
        report = check_onnx((out / name).read_bytes(), input_name="input", sample_shape=(3, 32, 32), max_batch=8)
        assert "parsed, built for SM86" in report


def test_benchmark_threads_max_images_and_budgets(tiny_run, tmp_path):
    from tledge.exporting import export_checkpoint
    from tledge_export import ExportConfig

    export_checkpoint(tiny_run.best, ExportConfig(out=str(tiny_run.out / "export-bench"), fp16=True), workers=2)
    data = make_dataset(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(main, ["benchmark", str(tiny_run.out / "export-bench"), str(tiny_run.best),
                                       "--data", str(data), "--threads", "1", "--max-images", "6", "--iters", "5",
                                       "--warmup", "1", "--budget-fp16", "0", "--budget-int8", "0", "--json",
                                       "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["images"] == 6  # two of each of the three classes
    fp16 = next(r for r in payload["rows"] if r["precision"] == "fp16")
    assert (fp16["status"] == "ok") == (fp16["delta_points"] >= 0)  # budget 0: any drop is over budget
    assert all(r["p50_ms"] for r in payload["rows"] if r["status"] == "ok")
