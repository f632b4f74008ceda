"""uint8 NHWC images -> the model's normalized float NCHW input, in torch, with the runtime's own factors.

The one torch implementation of the normalization step of the artifact contract: training, evaluation and
benchmarks in ``tledge`` and quantization-aware training here all call it, and it takes its factors from
:func:`tledge_runtime.image.preprocess.normalize_factors` (what the runtime and the baked ONNX graphs compute), so a
model is trained, fine-tuned through int8 and served on the same tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from tledge_runtime.image.preprocess import normalize_factors
from tledge_runtime.model.meta import Preprocess


class Normalize:
    """uint8 NHWC batch (tensor or array) -> float NCHW in channels-last memory (the fast layout for CPU
    convolutions), optionally mirrored left-right."""

    def __init__(self, p: Preprocess, device: torch.device | str = "cpu"):
        mul, add = normalize_factors(p)
        self.mul = torch.from_numpy(mul).to(device).view(1, 3, 1, 1)
        self.add = torch.from_numpy(add).to(device).view(1, 3, 1, 1)

    def __call__(self, batch_u8: torch.Tensor | np.ndarray, flip: bool = False) -> torch.Tensor:
        if isinstance(batch_u8, np.ndarray):
            batch_u8 = torch.from_numpy(np.ascontiguousarray(batch_u8))
        x = batch_u8.permute(0, 3, 1, 2).float()  # a permuted NHWC tensor *is* channels-last NCHW
        x = x.mul_(self.mul).add_(self.add).contiguous(memory_format=torch.channels_last)
        return x.flip(3) if flip else x
