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


def test_an_orientation_change_is_kept_only_if_its_head_does_as_well_within_one_image():
    from tledge.train.phases import keeps_class

    assert keeps_class("hflip", "mirrored", base=0.8122, changed=0.8223, n=197)  # ELPV split 0: on
    assert keeps_class("vflip", "flipped", base=0.8122, changed=0.8122, n=197)  # a tie: on
    assert keeps_class("vflip", "flipped", base=0.8122, changed=0.8122 - 1 / 197, n=197)  # one image: on
    assert not keeps_class("vflip", "flipped", base=0.8122, changed=0.8122 - 2 / 197, n=197)
    # digits split 1: a head on mirrored digits alone is 3 images worse; mirroring then cost the fine-tuned model
    # 2 points, so it must be off although the difference is inside two standard errors
    assert not keeps_class("hflip", "mirrored", base=0.9191, changed=0.8971, n=136)
