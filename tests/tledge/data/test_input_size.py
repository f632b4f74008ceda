"""The input size without --img-size: the arch's ImageNet size, or the images' own when they are smaller."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tledge.data.input_size import MIN_INPUT, input_size, typical_short_side
from tledge.train.checkpoint import load_checkpoint
from tledge.train.finetune import FinetuneConfig, finetune

from ...datasets import TINY, make_dataset, write_images


def test_small_images_train_at_their_own_size_rounded_to_the_stride():
    assert input_size(224, 8) == MIN_INPUT == 64  # an 8x8 digit: never under 64
    assert input_size(224, 100) == 128 and input_size(224, 128) == 128 and input_size(224, 129) == 160
    assert input_size(224, 200) == 224 and input_size(224, 300) == 224 and input_size(260, 250) == 256
    assert input_size(224, None) == 224  # nothing readable: the arch's size


def test_typical_side_reads_headers_skips_broken_files_and_follows_exif(tmp_path):
    paths = write_images(tmp_path / "a", (200, 40, 40), 5, seed=0, size=(40, 96))  # shorter side 40
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing valid after it
    rotated = tmp_path / "rotated.jpg"  # stored 30x90, EXIF says rotate 90: displayed 90x30, shorter side still 30
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((90, 30, 3), np.uint8)).save(rotated, exif=exif)
    assert typical_short_side([*paths, broken, rotated]) == 40
    assert typical_short_side([broken]) is None
    assert typical_short_side([rotated]) == 30


def test_a_run_without_img_size_trains_small_images_at_64_px(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)  # 40x48 images
    cfg = {**TINY, "img_size": None, "epochs": 1, "freeze_epochs": 1}
    result = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "run"), **cfg))
    assert load_checkpoint(result.best)["preprocess"]["height"] == 64
    assert "input 64 px: the training images are about 40 px" in (tmp_path / "run" / "train.log").read_text()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["img_size"] is None
