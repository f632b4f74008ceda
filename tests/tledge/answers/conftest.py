"""A fine-tuned run with enough held-out images to fit calibration, prediction sets and "unknown" (the shared
tiny run has 6 validation images: too few, which is what the "unfitted" tests use it for)."""

from __future__ import annotations

import pytest

from ...datasets import COLOURS, TINY, write_images

CLASSES = ("red", "green", "blue")


@pytest.fixture(scope="session")
def answered_run(tmp_path_factory):
    from tledge.train.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("answered")
    for k, name in enumerate(CLASSES):
        for j, (split, n) in enumerate((("train", 20), ("val", 12), ("test", 12))):
            write_images(root / "data" / split / name, COLOURS[name], n, seed=100 + 10 * k + j)
    return finetune(FinetuneConfig(data=str(root / "data"), out=str(root / "run"), **TINY))


@pytest.fixture(scope="session")
def answered_export(answered_run):
    from tledge.exporting import export_checkpoint
    from tledge_export import ExportConfig

    return export_checkpoint(answered_run.best, ExportConfig(fp16=True, int8=True, triton=True), workers=2)
