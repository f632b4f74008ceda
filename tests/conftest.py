"""Shared fixtures. Each area's own fixtures live in tests/<area>/conftest.py."""

import os

# Keep torch and onnxruntime on the cores CI gives us; oversubscription makes tests crawl.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest

from .datasets import tiny_run_fixture

# One real fine-tuning run (ImageNet EfficientNet-Lite0, 32 px, 3 colour classes), shared by every
# test that only reads its checkpoint: tests/tledge, tests/export, benchmark tests.
tiny_run = pytest.fixture(scope="session")(tiny_run_fixture)
