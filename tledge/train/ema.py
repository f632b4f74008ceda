"""An exponential moving average of the weights while fine-tuning: the weights best.pt (and every export) gets.

The average of the last few hundred steps' weights sits in a flatter part of the loss than the last step's,
which generalises better on small datasets and moves less from one epoch to the next (timm and torchvision's
references use it for the same reason). The decay ramps up as ``(1 + t) / (10 + t)`` until it reaches
``decay``, so a short run averages over its own length rather than over its random start.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """``model``: the averaged copy (eval mode, no gradients); :meth:`update` after every optimizer step."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(net).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.model.state_dict().values(), net.state_dict().values()):
            if averaged.dtype.is_floating_point:
                averaged.mul_(d).add_(current.detach(), alpha=1 - d)
            else:
                averaged.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
