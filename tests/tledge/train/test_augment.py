"""Training augmentation on a batch (tledge.train.transforms.BatchAugment): the orientation changes it draws."""

from __future__ import annotations

import pytest
import torch

from tledge.train.transforms import BatchAugment


def _corners_seen(**flags) -> set[tuple[int, int]]:
    """Where a bright top-left corner ends up over 64 draws of the whole image (no crop, no jitter)."""
    batch = torch.zeros((64, 16, 16, 3), dtype=torch.uint8)
    batch[:, :4, :4] = 255
    out = BatchAugment((16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0, **flags)(
        batch, torch.Generator().manual_seed(0))
    return {(int(img[:, :, 0].argmax()) // 16 // 8, int(img[:, :, 0].argmax()) % 16 // 8) for img in out}


def test_orientation_changes_reach_exactly_the_corners_they_should():
    none = dict(hflip=False, vflip=False, rot90=False)
    assert _corners_seen(**none) == {(0, 0)}
    assert _corners_seen(**{**none, "hflip": True}) == {(0, 0), (0, 1)}
    assert _corners_seen(**{**none, "vflip": True}) == {(0, 0), (1, 0)}
    assert _corners_seen(**{**none, "rot90": True}) == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_rotation_needs_a_square_input():
    with pytest.raises(ValueError, match="square"):
        BatchAugment((16, 24), rot90=True)
