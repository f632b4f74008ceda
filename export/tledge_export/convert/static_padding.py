"""TensorFlow-"same" padding made constant before export.

timm's ``tf_*`` models (the EfficientNet-Lite family) pad their stride-2 convolutions the TensorFlow way:
``Conv2dSame`` computes the padding from the input's height and width on every call. Traced, that is a
chain of Shape, Gather, Cast, Div, Ceil, Sub, Mul and Max nodes in front of each such convolution. The
artifact contract fixes the input's height and width (only the batch varies), so every one of those
paddings is a constant. Leaving the arithmetic in the graph costs three ways: an int8 quantizer sees
float scalars it may quantize, TensorRT builds shape computations, and the graph depends on onnxslim
folding it — and onnxslim 0.1.98 folds EfficientNet-Lite1 into a graph with wrong logits (see
:func:`tledge_export.convert.onnx_export.simplify`). So before export each ``Conv2dSame`` is replaced by a constant
``ZeroPad2d`` and a plain ``Conv2d`` sharing its weights: the same numbers, a static graph.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def static_same_padding(model: nn.Module, height: int, width: int) -> nn.Module:
    """``model`` unchanged if it has no ``Conv2dSame``; else a copy whose TF-"same" paddings are constants
    for (height, width) inputs."""
    try:
        from timm.layers import Conv2dSame, get_same_padding
    except ImportError:  # no timm: no timm layers either
        return model
    if not any(isinstance(m, Conv2dSame) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
             for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width))
    finally:
        for h in hooks:
            h.remove()
    for name, (ih, iw) in sizes.items():
        conv = model.get_submodule(name)
        pad_h = get_same_padding(ih, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = get_same_padding(iw, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, bias=conv.bias is not None)
        plain.weight, plain.bias = conv.weight, conv.bias  # the same parameters, not copies
        # timm's pad_same: the odd pixel goes right and bottom, as TensorFlow does
        padded = nn.Sequential(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)), plain)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, padded)
    return model
