"""Fixtures of the runtime tests: model files and image files written once per session.

The builders live in ``runtime_testkit.py`` (a unique module name, importable from
the test files because this folder is put on ``sys.path``: pytest runs in importlib
mode, which does not do that by itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from runtime_testkit import LABELS, colour_image, write_model


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """The well-formed model variants, written once per test session."""
    d = tmp_path_factory.mktemp("models")
    return {
        "fp32": write_model(d / "fp32.onnx", "fp32"),
        "fp16": write_model(d / "fp16.onnx", "fp16"),
        "baked": write_model(d / "baked.onnx", "baked"),
        "probabilities": write_model(d / "probs.onnx", "fp32", output_kind="probabilities"),
        "fixed2": write_model(d / "fixed2.onnx", "fp32", batch=2),
    }


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    """Real PNG and JPEG files per colour: {"red": [png, jpg, png, jpg], ...}."""
    d = tmp_path_factory.mktemp("images")
    out: dict[str, list[Path]] = {}
    for k, name in enumerate(LABELS):
        files = []
        for j in range(4):
            ext = "png" if j % 2 == 0 else "jpg"
            path = d / f"{name}_{j}.{ext}"
            Image.fromarray(colour_image(name, seed=10 * k + j, size=(40 + 7 * j, 30 + 5 * j))).save(path)
            files.append(path)
        out[name] = files
    return out


@pytest.fixture(scope="session")
def classifier(models):
    """One shared fp32 classifier on the CPU (tests that close theirs make their own)."""
    from tledge_runtime import Classifier

    with Classifier(models["fp32"], device="cpu") as clf:
        yield clf
