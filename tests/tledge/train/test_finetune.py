"""End-to-end fine-tuning on tiny real image folders (tledge.train.finetune)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tledge.errors import CheckpointError, ConfigError
from tledge.models import create_model
from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint
from tledge.train.finetune import FinetuneConfig, finetune, resume

from ...datasets import TINY, cli_options, make_dataset

TIME_KEYS = ("seconds", "images_per_s")


def _comparable(history):
    """History without timings, floats to 6 significant digits: oneDNN may order a float sum
    differently between two runs of the same process (1e-7 relative), which is not a different run."""
    return [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in h.items() if k not in TIME_KEYS}
            for h in history]


def test_run_writes_everything_and_learns(tiny_run):
    out = tiny_run.out
    for name in ("best.pt", "last.pt", "metrics.json", "history.csv", "curves.png", "confusion.png", "split.json",
                 "train.log"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9 and metrics["val_accuracy"] >= 0.9
    assert [h["phase"] for h in tiny_run.history] == ["head", "head", "finetune", "finetune"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "history.csv").read_text().splitlines()) == 1 + len(tiny_run.history)


def test_best_epoch_is_the_best_accuracy_with_ties_within_one_image_to_the_lower_loss(tiny_run):
    from tledge.train.run import TrainState

    state = TrainState(best_acc=0.9, best_epoch=3, best_loss=0.40, top_acc=0.9)
    assert state.improves(0.91, 0.90)  # a higher accuracy first, whatever the loss
    assert state.improves(0.9, 0.35) and not state.improves(0.9, 0.40) and not state.improves(0.89, 0.01)
    one = 1 / 50  # 50 validation images: one image is 2 points
    assert state.improves(0.88, 0.35, one_image=one)  # one image fewer at a lower loss: a tie, the lower loss wins
    assert not state.improves(0.88, 0.45, one_image=one) and not state.improves(0.86, 0.01, one_image=one)
    # ties are measured from the highest accuracy, not from the last tie: best.pt never drifts further down
    state = TrainState(best_acc=0.88, best_epoch=5, best_loss=0.35, top_acc=0.9)
    assert not state.improves(0.86, 0.30, one_image=one) and state.improves(0.88, 0.30, one_image=one)
    assert TrainState().improves(0.0, 5.0)  # the first epoch always counts
    # accuracies arrive as float32 (135/136 -> 0.99264705181): one image below the top is still a tie
    top = TrainState(best_acc=1.0, best_epoch=9, best_loss=0.103, top_acc=1.0)
    assert top.improves(float(torch.tensor(135 / 136, dtype=torch.float32)), 0.100, one_image=1 / 136)
    assert not top.improves(float(torch.tensor(134 / 136, dtype=torch.float32)), 0.100, one_image=1 / 136)
    # the real run picked by the same rule, and best.pt holds that epoch
    n_val = len(json.loads((tiny_run.out / "split.json").read_text())["val"])
    top, best_loss, expected = -1.0, float("inf"), None
    for h in tiny_run.history:
        if h["val_acc"] > top or (h["val_acc"] >= top - 1 / n_val - 1e-6 and h["val_loss"] < best_loss):
            top, best_loss, expected = max(top, h["val_acc"]), h["val_loss"], h["epoch"]
    assert json.loads((tiny_run.out / "metrics.json").read_text())["best_epoch"] == expected
    assert load_checkpoint(tiny_run.best)["epoch"] == expected


def test_a_last_checkpoint_from_before_top_acc_resumes_with_best_as_its_top(tiny_run):
    from tledge.train.run import TrainState

    saved = load_checkpoint(tiny_run.out / "last.pt")["state"]
    assert "top_acc" in saved  # what this version writes
    old = {k: v for k, v in saved.items() if k != "top_acc"}  # what a last.pt from before it holds
    state = TrainState.from_saved(old)
    assert state.top_acc == saved["best_acc"] and state.epoch == saved["epoch"]
    assert not state.improves(saved["best_acc"] - 0.5, 0.0)  # not a fresh state that any epoch would beat
    assert TrainState.from_saved(saved) == TrainState.from_saved({**saved, "phase": "finetune"})


def test_checkpoints_hold_only_plain_data_and_rebuild_their_model(tiny_run):
    raw = torch.load(tiny_run.best, map_location="cpu", weights_only=True)  # no pickled code anywhere
    assert raw["format"] == "tledge.train.checkpoint" and raw["arch"] == "efficientnet_lite0"
    assert raw["labels"] == ["blue", "green", "red"]
    assert raw["preprocess"]["height"] == 32 and raw["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert raw["config"]["img_size"] == 32 and raw["tledge_version"]
    assert "test_accuracy" in raw["metrics"]
    last = torch.load(tiny_run.out / "last.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "state", "rng"} <= set(last)
    model = model_from_checkpoint(load_checkpoint(tiny_run.best))
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 3)


def test_head_only_run_leaves_the_backbone_untouched(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8)
    cfg = FinetuneConfig(data=str(data), out=str(tmp_path / "run"), **{**TINY, "epochs": 2, "freeze_epochs": 2})
    result = finetune(cfg)
    trained = model_from_checkpoint(load_checkpoint(result.best))
    pretrained = create_model("efficientnet_lite0", 3, "imagenet")
    for (name, a), b in zip(trained.backbone.state_dict().items(), pretrained.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert all(h["phase"] == "head" for h in result.history)


def test_each_run_logs_only_to_its_own_train_log(tmp_path):
    """Two runs in one process (a script, a benchmark): the first's train.log ends with the first run."""
    data = make_dataset(tmp_path / "d", per_class=8)
    cfg = {**TINY, "epochs": 1, "freeze_epochs": 1}
    first = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "first"), **cfg))
    second = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "second"), **cfg))
    first_log, second_log = ((r.out / "train.log").read_text() for r in (first, second))
    assert str(first.out) in first_log and str(second.out) not in first_log
    assert str(second.out) in second_log and str(first.out) not in second_log


def test_same_seed_same_run_on_cpu(tiny_run, tmp_path):
    data = make_dataset(tmp_path / "data", per_class=16)
    again = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "run"), **TINY))
    assert _comparable(again.history) == _comparable(tiny_run.history)


def test_existing_run_folder_needs_resume(tiny_run):
    cfg = FinetuneConfig(data="unused", out=str(tiny_run.out), **TINY)
    with pytest.raises(ConfigError, match="already holds a run") as e:
        finetune(cfg)
    assert "--resume" in e.value.hint


def test_resume_needs_a_last_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resume(tmp_path)


@pytest.mark.slow
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    """SIGKILL mid-training, then --resume: nothing before the kill is lost and the result is the same."""
    opts = {**TINY, "epochs": 5, "freeze_epochs": 1}
    reference = finetune(FinetuneConfig(data=str(make_dataset(tmp_path / "a", per_class=40)),
                                        out=str(tmp_path / "ref"), **opts))
    data = make_dataset(tmp_path / "b", per_class=40)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "tledge", "finetune", str(data), "--out", str(out)]
    args += cli_options(opts)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TLEDGE_PROGRESS": "0"})
    killed_after = _kill_when(proc, out / "last.pt", min_epoch=2)
    assert killed_after < 5, "the run finished before it could be killed"
    assert not (out / "metrics.json").exists()
    before = load_checkpoint(out / "last.pt")["state"]["history"]
    resumed = subprocess.run([sys.executable, "-m", "tledge", "finetune", str(data), "--out", str(out), "--resume"],
                             capture_output=True, text=True, env={**os.environ, "TLEDGE_PROGRESS": "0"})
    assert resumed.returncode == 0, resumed.stderr
    history = load_checkpoint(out / "last.pt")["state"]["history"]
    assert _comparable(history[: len(before)]) == _comparable(before)  # nothing lost
    assert _comparable(history) == _comparable(reference.history)  # and the same run as without the kill
    final = json.loads((out / "metrics.json").read_text())
    assert final["test_accuracy"] == reference.metrics["test_accuracy"]


def _kill_when(proc: subprocess.Popen, last: Path, *, min_epoch: int, timeout: float = 300) -> int:
    """SIGKILL ``proc`` as soon as ``last`` records ``min_epoch`` completed epochs; returns that epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return 99
        if last.is_file():
            epoch = load_checkpoint(last)["state"]["epoch"]
            if epoch >= min_epoch:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return epoch
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("training never reached the epoch to kill at")


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(tmp_path):
    """The same command line under torchrun with two CPU processes (gloo) trains and writes one run."""
    data = make_dataset(tmp_path / "d", per_class=16)
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "tledge", "finetune", str(data), "--out", str(out), "--device", "cpu",
            "--img-size", "32", "--epochs", "3", "--freeze-epochs", "1", "--batch-size", "16", "--workers", "1"]
    env = {**os.environ, "TLEDGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["test_accuracy"] >= 0.9
    history = load_checkpoint(out / "last.pt")["state"]["history"]
    assert [h["phase"] for h in history] == ["head", "finetune", "finetune"]
    # Each fine-tuning epoch covered the training images once, half on each process.
    n_train = len(json.loads((out / "split.json").read_text())["train"])
    assert [h["images"] for h in history[1:]] == [2 * (n_train // 2)] * 2


def test_adapt_bn_re_estimates_statistics_and_touches_no_weight(tmp_path):
    """--adapt-bn: BatchNorm running statistics move to the data's, every learned weight stays ImageNet's."""
    data = make_dataset(tmp_path / "d", per_class=12)
    cfg = FinetuneConfig(data=str(data), out=str(tmp_path / "run"),
                         **{**TINY, "img_size": 64, "epochs": 1, "freeze_epochs": 1, "adapt_bn": True})
    adapted = model_from_checkpoint(load_checkpoint(finetune(cfg).best)).backbone.state_dict()
    imagenet = create_model("efficientnet_lite0", 3, "imagenet").backbone.state_dict()
    moved = [k for k in imagenet if k.endswith("running_mean") and not torch.allclose(adapted[k], imagenet[k])]
    assert len(moved) >= 40  # (nearly) every BatchNorm layer
    for k, v in imagenet.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(adapted[k], v, msg=k)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "BatchNorm statistics re-estimated on" in log
