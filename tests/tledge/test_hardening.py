"""Hardening across the toolchain: nasty image folders through every command, untrusted checkpoints,
and repeated SIGKILLs during fine-tuning. Every case ends in a counted skip or a one-line error,
never a traceback, a hang, or partial output presented as success."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tledge.cli.main import main
from tledge.train.checkpoint import load_checkpoint

from ..datasets import COLOURS, make_dataset
from ..kills import rewritten, run_and_kill_when

NON_UTF8 = os.fsdecode(b"caf\xe9-latin1.png")  # a file name that is not valid UTF-8


def add_nasty_files(folder: Path, colour) -> dict[str, str]:
    """Every awkward file a real dataset contains. Returns {name: 'ok' | 'skip'} — what tledge must do."""
    rng = np.random.default_rng(1)
    base = (np.array(colour)[None, None] + rng.normal(0, 15, (48, 40, 3))).clip(0, 255).astype(np.uint8)
    expect = {}

    def save(name, img, fmt=None, ok=True, **kw):
        img.save(folder / name, fmt, **kw)
        expect[name] = "ok" if ok else "skip"

    save("cmyk.jpg", Image.fromarray(base).convert("CMYK"))
    save("gray16.png", Image.fromarray(base[:, :, 0].astype(np.uint16) * 257))
    pal = Image.fromarray(base).quantize(16)
    save("palette.png", pal, transparency=0)
    save("rgba.png", Image.fromarray(np.dstack([base, np.full(base.shape[:2], 200, np.uint8)])))
    save("one_pixel.png", Image.fromarray(base[:1, :1]))
    save("large.jpg", Image.fromarray(np.tile(base, (60, 80, 1))))  # 2880 x 3200
    save("UPPER.PNG", Image.fromarray(base))
    exif = Image.Exif()
    exif[0x0112] = 8
    save("exif_rotated.jpg", Image.fromarray(base), exif=exif)
    save(NON_UTF8, Image.fromarray(base), "PNG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a JPEG at all")
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[:100])
    Image.new("1", (40_000, 40_000)).save(folder / "bomb.png")
    expect.update({n: "skip" for n in ("zero.jpg", "text.jpg", "truncated.jpg", "truncated.png", "bomb.png")})
    Image.fromarray(base).save(folder / ".hidden.png")  # never listed
    (folder / "loop").mkdir()
    os.symlink("..", folder / "loop" / "up")  # a directory symlink cycle
    return expect


@pytest.fixture(scope="module")
def nasty(tmp_path_factory):
    root = tmp_path_factory.mktemp("nasty")
    data = make_dataset(root / "data", per_class=10, classes=("red", "green"))
    expect = add_nasty_files(data / "red", COLOURS["red"])
    return data, expect


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_every_command_survives_a_nasty_folder(nasty, tmp_path):
    data, expect = nasty
    skips = sum(v == "skip" for v in expect.values())
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(main, ["finetune", str(data), "--out", str(out), "--img-size", "32", "--epochs", "2",
                             "--freeze-epochs", "1", "--workers", "2", "--test-split", "0.3"])
    _no_traceback(r)
    assert r.exit_code == 0, r.output
    assert f"skipped {skips} of " in r.output
    skipped_names = {Path(os.fsdecode(line.split(b"\t")[0])).name
                     for line in (out / "skipped.txt").read_bytes().splitlines()}
    assert skipped_names == {n for n, v in expect.items() if v == "skip"}
    split = json.loads((out / "split.json").read_text())
    listed = {Path(p).name for name in ("train", "val", "test") for p, _ in split[name]}
    assert ".hidden.png" not in listed and NON_UTF8 in listed and "UPPER.PNG" in listed

    r = runner.invoke(main, ["evaluate", str(out / "best.pt"), str(data), "--json"])
    _no_traceback(r)
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == skips

    r = runner.invoke(main, ["export", str(out / "best.pt"), "--int8", "--calib", str(data), "--budget", "100",
                             "--min-agreement", "0", "--json"])
    _no_traceback(r)
    assert r.exit_code == 0, r.output
    assert (out / "export" / "model.int8.onnx").is_file()

    r = runner.invoke(main, ["benchmark", str(out), "--data", str(data), "--iters", "5", "--warmup", "1", "--json"])
    _no_traceback(r)
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["skipped"] == skips and payload["images"] == 20 + len(expect) - skips


def test_runtime_classifies_or_refuses_every_file(nasty, tiny_run, tmp_path):
    from tledge.exporting import export_checkpoint
    from tledge_runtime import Classifier
    from tledge_runtime.errors import ImageError

    data, expect = nasty
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out, run)
    export_checkpoint(run / "best.pt")
    with Classifier(run / "export" / "model.onnx") as clf:
        for name, verdict in expect.items():
            path = data / "red" / name
            if verdict == "ok":
                assert clf.predict(path).label in clf.labels, name
            else:
                with pytest.raises(ImageError) as e:
                    clf.predict(path)
                assert e.value.hint, name
    # The device CLI: a bad file among good ones is one error line, the rest still classified.
    files = [str(data / "red" / n) for n in ("cmyk.jpg", "zero.jpg", "UPPER.PNG")]
    proc = subprocess.run([sys.executable, "-m", "tledge_runtime.cli", "predict", str(run / "export" / "model.onnx"),
                           *files, "--json"], capture_output=True, text=True)
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) >= 2
    assert "zero.jpg" in proc.stderr and proc.returncode == 2


def test_a_class_of_only_bad_files_stops_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6, classes=("red", "green"))
    bad = data / "blue"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("nope")
    r = CliRunner().invoke(main, ["finetune", str(data), "--out", str(tmp_path / "run"), "--img-size", "32"])
    _no_traceback(r)
    assert r.exit_code == 2 and "blue have no readable images" in r.output
    assert not (tmp_path / "run" / "best.pt").exists()


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("command", ["evaluate", "export", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "run" / ("last.pt" if command == "resume" else "best.pt")
    evil.parent.mkdir()
    torch.save({"format": "tledge.train.checkpoint", "arch": "resnet18", "payload": _Payload(marker)}, evil)
    data = make_dataset(tmp_path / "data", per_class=2)
    args = {"evaluate": ["evaluate", str(evil), str(data)], "export": ["export", str(evil)],
            "resume": ["finetune", str(data), "--out", str(evil.parent), "--resume"]}[command]
    r = CliRunner().invoke(main, args)
    _no_traceback(r)
    assert r.exit_code == 2 and "would run code" in r.output
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.slow
def test_repeated_random_sigkills_then_resume_match_an_uninterrupted_run(tmp_path):
    """Kill -9 at random moments (decoding, head phase, fine-tuning, checkpoint writes), resume each
    time; the final run equals one that was never interrupted (same seed, CPU)."""
    from tledge.train.finetune import FinetuneConfig, finetune

    opts = dict(img_size=32, epochs=5, freeze_epochs=1, batch_size=16, workers=2, seed=3)
    reference = finetune(FinetuneConfig(data=str(make_dataset(tmp_path / "a", per_class=30)), out=str(tmp_path / "ref"),
                                        **opts))
    data = make_dataset(tmp_path / "b", per_class=30)
    out = tmp_path / "killed"
    cli = [sys.executable, "-m", "tledge", "finetune", str(data), "--out", str(out)]
    for k, v in opts.items():
        cli += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TLEDGE_PROGRESS": "0"}
    rng = random.Random(11)
    # Kills wait for events the run causes, not for guessed times, so they land in the same phases on a
    # fast machine and an overloaded one: the first soon after the run folder appears (start-up, decoding,
    # the head phase), each later one a random moment after the run has written a new checkpoint (the next
    # epoch's training, or the next checkpoint write). Every resumed run thus finishes one epoch first.
    kills = kills_after_a_checkpoint = 0
    for attempt in range(8):
        resuming = (out / "last.pt").exists()
        if attempt == 0:
            event, delay = (lambda: out.exists()), rng.uniform(0.5, 3.0)
        else:  # after a checkpoint, or (when the first kill came before any) as the first one appears
            event, delay = rewritten(out / "last.pt"), rng.uniform(0.0, 0.4)
        if run_and_kill_when(cli + (["--resume"] if resuming else []), event, delay, env) is not None:
            break  # it finished before the kill
        kills += 1
        kills_after_a_checkpoint += resuming
        if (out / "last.pt").exists():
            load_checkpoint(out / "last.pt")  # always loadable: checkpoints are written atomically
    if not (out / "metrics.json").exists():
        done = subprocess.run(cli + (["--resume"] if (out / "last.pt").exists() else []), capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stderr
    assert kills >= 2 and kills_after_a_checkpoint >= 1, (kills, kills_after_a_checkpoint)
    history = load_checkpoint(out / "last.pt")["state"]["history"]
    from .train.test_finetune import _comparable

    assert _comparable(history) == _comparable(reference.history)
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == reference.metrics["test_accuracy"]
