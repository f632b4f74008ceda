"""The out-of-distribution score as a second output of the exported graph.

:class:`WithScore` wraps a classifier split into its feature extractor and its classifier head; its forward
returns ``(logits, ood_score)``. :class:`OODHead` holds a fitted detector's arrays as buffers (see
:mod:`tledge.answers.ood` for the methods and how they are fitted) and computes the same arithmetic the numpy
fit does, so the score travels inside the model file and every backend and precision computes it. Its nodes are
named ``/ood/...`` in the ONNX graph: fp16 keeps them in float32 and int8 leaves them unquantized (a handful of
small matrix products; squared distances overflow fp16 on far-away images).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

SCORE_NAME = "ood_score"  # the graph output's name, and the tensor name in Triton's repository
NODE_PREFIX = "/ood/"  # ONNX node names of the head (the module attribute is "ood")


class OODHead(nn.Module):
    """``score(features, logits) -> (N, 1)``: higher = further from the training data."""

    def __init__(self, method: str, arrays: Mapping[str, np.ndarray], temperature: float = 1.0, neighbour: int = 10):
        super().__init__()
        self.method, self.temperature, self.neighbour = method, float(temperature), int(neighbour)
        for name, value in arrays.items():
            self.register_buffer(name, torch.as_tensor(np.asarray(value, dtype=np.float32)))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.method == "mahalanobis":
            # squared distance to each centre from the differences themselves: expanding |u|^2 - 2u.c + |c|^2
            # cancels most digits in float32 when the centres are far from the origin
            diff = self._projected(features).unsqueeze(1) - self.centres.unsqueeze(0)
            return (diff * diff).sum(-1).min(dim=1, keepdim=True).values
        if self.method == "knn":
            z = self._projected(features)
            z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
            k = min(self.neighbour, self.bank.shape[0])
            return 1.0 - torch.topk(z @ self.bank.T, k, dim=1).values[:, k - 1:k]
        z = logits / self.temperature
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        if self.method == "energy":
            return -self.temperature * lse
        return -torch.exp(z.max(dim=1, keepdim=True).values - lse)  # msp

    def _projected(self, features: torch.Tensor) -> torch.Tensor:
        """Centred before projecting (see tledge.answers.ood._projected); ``offset``: detectors fitted earlier."""
        if hasattr(self, "mean"):
            return (features - self.mean) @ self.project.T
        return features @ self.project.T - self.offset


class WithScore(nn.Module):
    """``x -> (logits, ood_score)``: ``features`` (image -> pooled features), ``classifier`` (features -> logits)
    and the out-of-distribution head on both."""

    def __init__(self, features: nn.Module, classifier: nn.Module, ood: OODHead):
        super().__init__()
        self.features, self.classifier, self.ood = features, classifier, ood

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        logits = self.classifier(f)
        return logits, self.ood(f, logits)


def ood_nodes(model) -> list[str]:
    """The names of the graph's out-of-distribution head nodes (an ``onnx.ModelProto``)."""
    return [n.name for n in model.graph.node if n.name.startswith(NODE_PREFIX)]
