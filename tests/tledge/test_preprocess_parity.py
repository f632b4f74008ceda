"""Training feeds its model the tensor the device feeds it: parity on the code paths training really runs.

Preprocessing drift is the first cause of "the model on the device is worse than in PyTorch". tledge has
one implementation (tledge_runtime.image.preprocess); these tests check that every training-side consumer gets
exactly its output, pixel for pixel and float for float:

- validation/test decoding (what evaluate, export verification and calibration, and benchmark use);
- the training images' eval view, which the cached head features and AdaBN are computed on;
- the head features themselves, against the backbone run on the runtime's normalized tensor;
- torch normalization against the runtime's Normalizer.

Files larger and smaller than the model input, in every mode tledge converts, with both resize policies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tledge.data.folders import Sample
from tledge.data.imagecache import decode_images, train_geometry
from tledge.train.transforms import Normalize
from tledge_runtime.image.preprocess import Normalizer, prepare_image, preprocess
from tledge_runtime.model.meta import Preprocess

rng = np.random.default_rng(7)


def _rgb(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    return (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def mode_files(folder) -> list:
    """One real file per image mode tledge must treat consistently, smaller and larger than the model input."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "rgb_large.jpg": Image.fromarray(_rgb(900, 1200)),  # JPEG draft decoding and box reduction
        "rgb.jpg": Image.fromarray(_rgb(48, 64)),
        "gray.png": Image.fromarray(_rgb(300, 300)[:, :, 0]),
        "rgba.png": Image.fromarray(np.dstack([_rgb(120, 90), rng.integers(0, 256, (120, 90), dtype=np.uint8)])),
        "gray16.png": Image.fromarray((_rgb(91, 37)[:, :, 1].astype(np.uint16) * 257)),
        "cmyk.jpg": Image.fromarray(_rgb(200, 150)).convert("CMYK"),
        "tiny.png": Image.fromarray(_rgb(3, 2)),
        "thin.png": Image.fromarray(_rgb(2, 900)),
    }
    paths = []
    for name, img in images.items():
        img.save(folder / name)
        paths.append(folder / name)
    pal = Image.fromarray(_rgb(64, 80)).quantize(32)
    pal.save(folder / "palette.png", transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 100x60, displayed 60x100
    Image.fromarray(_rgb(60, 100)).save(folder / "exif_rotated.jpg", exif=exif)
    return paths + [folder / "palette.png", folder / "exif_rotated.jpg"]


PREPROCESS = [
    Preprocess(height=40, width=40),
    Preprocess(height=32, width=32, crop_ratio=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    Preprocess(height=24, width=36, resize="stretch"),
]
IDS = ["crop", "crop-0.875-bicubic", "stretch"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return mode_files(tmp_path_factory.mktemp("modes"))


@pytest.mark.parametrize("p", PREPROCESS, ids=IDS)
def test_decoded_splits_equal_the_device_input(files, p):
    samples = [Sample(path, 0) for path in files]
    held_out = decode_images(samples, p, workers=2)  # val/test: evaluate, export, benchmark
    train = decode_images(samples, train_geometry(p), p, workers=2)  # train: augmentation store + eval view
    assert not held_out.skipped and not train.skipped
    assert train.views[0].shape[1:3] != (p.height, p.width)  # the augmentation store is larger
    for i, path in enumerate(files):
        device = prepare_image(path, p)  # what Classifier.prepare returns on a device
        np.testing.assert_array_equal(held_out.images[i], device, err_msg=path.name)
        np.testing.assert_array_equal(train.views[1][i], device, err_msg=path.name)


def test_torch_normalize_is_bitwise_the_runtime_normalizer(files):
    p = PREPROCESS[1]
    batch = np.stack([prepare_image(path, p) for path in files])
    np.testing.assert_array_equal(Normalize(p)(torch.from_numpy(batch)).numpy(), Normalizer(p)(batch))


@pytest.mark.slow
@pytest.mark.parametrize("p", PREPROCESS[:2], ids=IDS[:2])
def test_cached_head_features_are_the_backbone_on_the_device_tensor(files, p):
    """The head warm-up trains on features of exactly the tensor the exported model will be given."""
    from tledge.models import create_model
    from tledge.train.config import FinetuneConfig
    from tledge.train.distributed import Dist
    from tledge.train.phases import train_features
    from tledge.train.run import Run, TrainState

    torch.manual_seed(0)
    net = create_model("efficientnet_lite0", 2, "none").eval()
    samples = [Sample(path, k % 2) for k, path in enumerate(files)]
    train = decode_images(samples, train_geometry(p), p, workers=2)
    cfg = FinetuneConfig(data="unused", batch_size=4, img_size=p.height)
    run = Run(cfg, Dist(), files[0].parent, None, p, train, train, train, net, Normalize(p), TrainState(),
              torch.Generator(), torch.Generator())
    views = train_features(run)  # every orientation is still to be decided: all four views are cached
    changes = {"plain": lambda x: x, "hflip": lambda x: x.flip(3), "vflip": lambda x: x.flip(2),
               "rot90": lambda x: x.rot90(1, dims=(2, 3))}  # NCHW here, NHWC in phases.ORIENTATIONS
    assert set(views) == set(changes)
    with torch.no_grad():
        for i, path in enumerate(files):
            x = torch.from_numpy(preprocess(path, p))
            for name, change in changes.items():
                np.testing.assert_allclose(views[name][i].numpy(), net.backbone(change(x))[0].numpy(), atol=1e-5,
                                           err_msg=f"{path.name} {name}")
    assert all(len(v) == len(files) for v in views.values())
