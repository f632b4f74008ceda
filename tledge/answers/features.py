"""The fine-tuned model's outputs on a split, for fitting answers: pooled backbone features and logits (the
head is one matrix product on the features, so the backbone runs once)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tledge.answers.fit import Split
from tledge.train.loops import infer


def split_outputs(net: Any, images: np.ndarray, labels: np.ndarray, normalize: Any, *, batch_size: int,
                  device: torch.device, desc: str) -> Split:
    """Features and logits of ``net`` (a :class:`tledge.models.Net`, eval mode) on uint8 NHWC ``images``."""
    features = infer(net.backbone, images, normalize, batch_size=batch_size, device=device, desc=desc).float()
    with torch.no_grad():
        logits = net.head(features.to(device)).float().cpu()
    return Split(features.numpy().astype(np.float64), logits.numpy().astype(np.float64), np.asarray(labels))


def max_ood_bytes(net: Any) -> int:
    """What the out-of-distribution parameters may add: 512 KB or 5% of the fp32 model file, the larger."""
    params = sum(p.numel() for p in net.parameters())
    return max(512 * 1024, int(0.05 * 4 * params))
