"""What every inference backend is: one model loaded on one engine, behind one small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tledge_runtime.model.meta import ModelMeta

Shape = tuple  # of int (fixed) or None (dynamic)


class Backend(ABC):
    """One model loaded on one inference engine. ``run`` is safe to call from several threads."""

    name: str = ""
    input_name: str = ""
    output_name: str = ""
    input_dtype: np.dtype = np.dtype(np.float32)
    input_shape: Shape = ()
    output_shape: Shape = ()
    max_batch: Optional[int] = None  # largest batch one run() accepts; None: no limit
    score_name: Optional[str] = None  # the out-of-distribution score output, when the model carries one

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """The graph's output for ``batch`` (already in the graph's layout and dtype)."""

    def run_scored(self, batch: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The graph's logits and, when the model has one (:attr:`score_name`), its out-of-distribution score
        for ``batch``, from one run of the graph."""
        return self.run(batch), None

    def close(self) -> None:
        """Release the engine; the backend cannot run afterwards."""

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the graph requires, or None when its batch axis is dynamic."""
        return self.input_shape[0] if self.input_shape else None


@dataclass(frozen=True)
class Opened:
    """What :func:`open_backend` returns: the backend, the model's metadata and why this backend."""

    backend: Backend
    meta: ModelMeta
    reason: str


@dataclass(frozen=True)
class BackendInfo:
    """Whether one backend can run on this machine (for ``tledge-runtime info``)."""

    name: str
    available: bool
    detail: str


def score_output(meta: ModelMeta) -> Optional[str]:
    """The name of the graph output holding the out-of-distribution score, or None when the model has none."""
    ood = meta.answers.ood if meta.answers is not None else None
    return ood.output if ood is not None else None
