"""Fixtures of the export tests: exports of the shared tiny run, made once per session.

- ``exported``: the Python API (``tledge.exporting.export_checkpoint``) with fp16 and CPU int8.
- ``exported_cli``: the CLI with TensorRT int8, baked preprocessing, --engine and --triton
  (no full TensorRT here, so the engines are reported unavailable and the command exits 1).
- ``held_out``: the run's held-out images and the PyTorch model, to check files independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner


@dataclass
class HeldOut:
    images: np.ndarray  # uint8 NHWC at model size
    labels: np.ndarray
    x: np.ndarray  # normalized NCHW float32 (what a non-baked model takes)
    logits: np.ndarray  # PyTorch's
    model: Any
    meta_labels: tuple


@pytest.fixture(scope="session")
def held_out(tiny_run) -> HeldOut:
    from tledge.data.folders import Splits
    from tledge.data.imagecache import decode_images
    from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
    from tledge_export.verify.run import torch_logits
    from tledge_runtime.image.preprocess import Normalizer

    ckpt = load_checkpoint(tiny_run.best)
    prep = preprocess_of(ckpt)
    splits = Splits.from_json((tiny_run.out / "split.json").read_text())
    decoded = decode_images(splits.val + splits.test, prep, workers=2)
    x = Normalizer(prep)(decoded.images)
    model = model_from_checkpoint(ckpt)
    return HeldOut(decoded.images, decoded.labels, x, torch_logits(model, x), model, tuple(ckpt["labels"]))


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """fp32 + fp16 + int8 (CPU flavour) through the Python API."""
    from tledge.exporting import export_checkpoint
    from tledge_export import ExportConfig

    out = tmp_path_factory.mktemp("export-api")
    return export_checkpoint(tiny_run.best, ExportConfig(out=str(out), fp16=True, int8=True), workers=2)


@dataclass
class CliExport:
    out: Path
    exit_code: int
    stdout: str
    output: str
    exception: Any  # what escaped the command, if anything but its own SystemExit


@pytest.fixture(scope="session")
def exported_cli(tiny_run, tmp_path_factory) -> CliExport:
    """fp32 + fp16 + int8 (TensorRT flavour), baked preprocessing, engines and Triton, through the CLI."""
    from tledge.cli.main import main

    out = tmp_path_factory.mktemp("export-cli")
    result = CliRunner().invoke(main, ["export", str(tiny_run.best), "--out", str(out), "--fp16", "--int8",
                                       "--target", "tensorrt", "--bake-preprocess", "--engine", "--triton",
                                       "--calib-method", "percentile", "--workers", "2"])
    escaped = None if isinstance(result.exception, SystemExit) else result.exception
    return CliExport(out, result.exit_code, result.stdout, result.output, escaped)
