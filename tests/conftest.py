"""Shared fixtures. Each area's own fixtures live in tests/<area>/conftest.py."""

import os
import tempfile

# Keep torch and onnxruntime on the cores CI gives us; oversubscription makes tests crawl.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The runtime's caches (TensorRT EP engines, OpenVINO blobs, auto's measured choices) go to a folder of the
# session, never to the user's ~/.cache; device="auto" does not measure (tests/runtime/backends/test_auto.py does).
os.environ.setdefault("TLEDGE_CACHE", tempfile.mkdtemp(prefix="tledge-test-cache-"))
os.environ.setdefault("TLEDGE_AUTO_MEASURE", "0")

import pytest

from .datasets import tiny_run_fixture

# One real fine-tuning run (ImageNet EfficientNet-Lite0, 32 px, 3 colour classes), shared by every
# test that only reads its checkpoint: tests/tledge, tests/export, benchmark tests.
tiny_run = pytest.fixture(scope="session")(tiny_run_fixture)
