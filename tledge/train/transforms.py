"""Training-side tensors: train augmentation, and normalisation in torch.

The eval transform (decode, orient, resize/crop) is not here: it has one implementation,
:mod:`tledge_runtime.image.preprocess`, which :mod:`tledge.data.imagecache` calls for every split.

- :class:`BatchAugment`: random-resized-crop, flips and light brightness/contrast jitter,
  applied to a whole batch of decoded uint8 images at once (see :mod:`tledge.data.imagecache`).
- :class:`Normalize`: uint8 NHWC batch -> normalised float NCHW (channels-last memory), with the
  runtime's own factors; it lives in :mod:`tledge_export.normalize` (QAT there uses it too) and is
  re-exported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tledge_export.normalize import Normalize

__all__ = ["BatchAugment", "Normalize"]


class BatchAugment:
    """Standard ImageNet-style train augmentation on a uint8 NHWC batch, seeded by a torch Generator.

    Random-resized-crop (area ``scale``, aspect ``ratio``) resized with antialiasing to
    ``size``, horizontal flip, optional vertical flip and rotation by a random multiple of 90 degrees (a
    square ``size`` only), and brightness/contrast jitter of +-``jitter``. Returns uint8 NHWC so normalisation
    stays in one place.
    """

    def __init__(self, size: tuple[int, int], *, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, vflip: bool = False,
                 rot90: bool = False, jitter: float = 0.2):
        if rot90 and size[0] != size[1]:
            raise ValueError(f"rotating by 90 degrees needs a square input, not {size[1]}x{size[0]}")
        self.size, self.scale, self.ratio = size, scale, ratio
        self.hflip, self.vflip, self.rot90, self.jitter = hflip, vflip, rot90, jitter

    def __call__(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, h, w, _ = batch.shape
        out = torch.empty((n, *self.size, 3), dtype=torch.uint8)
        u = torch.rand((n, 6), generator=gen)  # one row of uniform draws per image
        for i in range(n):
            top, left, ch, cw = self._crop_box(h, w, gen)
            crop = batch[i, top:top + ch, left:left + cw].permute(2, 0, 1)[None].float()
            img = F.interpolate(crop, size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]
            if self.hflip and u[i, 0] < 0.5:
                img = img.flip(2)
            if self.vflip and u[i, 1] < 0.5:
                img = img.flip(1)
            if self.rot90:
                img = img.rot90(int(4 * u[i, 4]) % 4, dims=(1, 2))
            if self.jitter > 0:
                brightness = 1 + self.jitter * (2 * u[i, 2] - 1)
                contrast = 1 + self.jitter * (2 * u[i, 3] - 1)
                mean = img.mean()
                img = (img - mean) * contrast + mean * brightness
            out[i] = img.clamp_(0, 255).round_().permute(1, 2, 0).to(torch.uint8)
        return out

    def _crop_box(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from ``gen``."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(1, generator=gen).item())
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=gen).item())
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                return top, left, ch, cw
        side = min(h, w)  # fallback: centre square
        return (h - side) // 2, (w - side) // 2, side, side
