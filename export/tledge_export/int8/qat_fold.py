"""Torch-module surgery for quantization-aware training: BatchNorm folded into its convolution, and the
convolutions whose outputs ONNX Runtime quantizes on their own. Found by running the model once and matching
tensors, so any architecture works without knowing its module names."""

from __future__ import annotations

from typing import Any

from tledge_export.errors import ExportError

FOLD_ATOL = 1e-3  # |logit| difference allowed between the model and its BatchNorm-folded copy


def fold_batchnorm(net: Any, sample: Any) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place; returns how many.

    Pairs are found by running ``sample`` once and matching tensors (a BatchNorm whose input *is* a
    convolution's output), so any architecture works without knowing its module names. A BatchNorm
    with a built-in activation (timm's ``BatchNormAct2d``) becomes that activation. The folded model
    must give the same logits as before (within ``FOLD_ATOL``), else :class:`ExportError`.
    """
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    with torch.no_grad():
        before = net(sample)
    names = {m: n for n, m in net.named_modules()}
    produced: dict[int, nn.Module] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def after_conv(m: nn.Module, _inputs: Any, out: Any) -> None:
        produced[id(out)] = m

    def before_bn(m: nn.Module, inputs: Any) -> None:
        conv = produced.get(id(inputs[0]))
        if conv is not None and all(m is not b for _, b in pairs):
            pairs.append((conv, m))

    _trace(net, sample, after_conv, before_bn, [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    convs = [c for c, _ in pairs]
    if len(set(map(id, convs))) != len(convs):
        raise ExportError("a convolution feeds two BatchNorms; cannot fold", hint="report this architecture")
    for conv, bn in pairs:
        fused = fuse_conv_bn_eval(conv, _plain_bn(bn))
        _set_module(net, names[conv], fused)
        act = getattr(bn, "act", None)
        tail = [m for m in (getattr(bn, "drop", None), act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
        _set_module(net, names[bn], nn.Sequential(*tail) if tail else nn.Identity())
    with torch.no_grad():
        after = net(sample)
    diff = float((after - before).abs().max())
    if diff > FOLD_ATOL * max(1.0, float(before.abs().max())):
        raise ExportError(f"folding BatchNorm changed the logits by {diff:.2g}",
                          hint="a BatchNorm's input is used elsewhere too; report this architecture")
    return len(pairs)


def _plain_bn(bn: Any) -> Any:
    """A plain ``BatchNorm2d`` with ``bn``'s statistics and affine parameters (subclasses may carry extras)."""
    import torch
    from torch import nn

    plain = nn.BatchNorm2d(bn.num_features, eps=bn.eps, affine=True).eval()
    with torch.no_grad():
        plain.running_mean.copy_(bn.running_mean)
        plain.running_var.copy_(bn.running_var)
        plain.weight.copy_(bn.weight if bn.affine else 1.0)
        plain.bias.copy_(bn.bias if bn.affine else 0.0)
    return plain


def _set_module(root: Any, name: str, module: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def unactivated_convs(net: Any, sample: Any) -> list[str]:
    """Convolutions whose output is not consumed by an activation module: ONNX Runtime quantizes their
    output tensor itself (a residual branch before its Add), so QAT must simulate it there too."""
    from torch import nn

    acts = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Hardswish)
    produced: dict[int, str] = {}
    activated: set[str] = set()
    names = {m: n for n, m in net.named_modules()}

    def after_conv(m: Any, _inputs: Any, out: Any) -> None:
        produced[id(out)] = names[m]

    def before_act(m: Any, inputs: Any) -> None:
        if id(inputs[0]) in produced:
            activated.add(produced[id(inputs[0])])

    # A folded BatchNormAct became Sequential(activation): it counts as the activation it holds.
    watched = [m for m in net.modules() if isinstance(m, acts) or (isinstance(m, nn.Sequential) and len(m)
                                                                    and isinstance(m[-1], acts))]
    _trace(net, sample, after_conv, before_act, watched)
    return [n for n in produced.values() if n not in activated]


def _trace(net: Any, sample: Any, after_conv: Any, before: Any, consumers: list) -> None:
    """Run ``sample`` once with ``after_conv`` hooked after every convolution and ``before`` ahead of each of
    ``consumers``: how the functions above see which module feeds which."""
    import torch
    from torch import nn

    hooks = [m.register_forward_hook(after_conv) for m in net.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before) for m in consumers]
    try:
        with torch.no_grad():
            net(sample)
    finally:
        for h in hooks:
            h.remove()
