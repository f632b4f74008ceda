"""Shared fixtures. Each area's own fixtures live in tests/<area>/conftest.py."""

import os

# Keep torch and onnxruntime on the cores CI gives us; oversubscription makes tests crawl.
os.environ.setdefault("OMP_NUM_THREADS", "2")
