"""Signed model folders and a versioned model repository that updates itself (issue 21).

- :mod:`~tledge_runtime.repository.signature`: verify a folder's ``model.sig`` (OpenSSF model-signing's format)
  against trusted public keys (:mod:`~tledge_runtime.repository.keys`);
- :mod:`~tledge_runtime.repository.repository`: :class:`ModelRepository`, ``DIR/<name>/<version>/`` (Triton's
  layout): the highest version that verifies, passes its reference check and warms up serves; new
  versions are swapped in atomically, bad ones refused with their reason.

Names load on first use: ``import tledge_runtime.repository`` costs nothing until a key or a folder is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ModelRepository", "load_trusted_keys", "verify_folder"]

if TYPE_CHECKING:
    from tledge_runtime.repository.keys import load_trusted_keys
    from tledge_runtime.repository.repository import ModelRepository
    from tledge_runtime.repository.signature import verify_folder

_HOMES = {"ModelRepository": "repository", "load_trusted_keys": "keys", "verify_folder": "signature"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"tledge_runtime.repository.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'tledge_runtime.repository' has no attribute {name!r}")
