"""Frozen BatchNorm folded into its convolution (tledge.train.speed.fold): the same function, the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tledge.models import create_model, train_mode
from tledge.train.speed.fold import find_pairs, folded


def _logits_and_grads(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the same dropout draws on every call
        logits = net(x)
    F.cross_entropy(logits, torch.arange(len(x)) % 3).backward()
    return logits.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("arch, weights, pairs", [("efficientnet_lite0", "imagenet", 49), ("resnet18", "none", 20)])
def test_every_conv_batchnorm_pair_folds_to_the_same_logits_and_gradients(arch, weights, pairs):
    torch.manual_seed(0)
    net = train_mode(create_model(arch, 3, weights).to(memory_format=torch.channels_last))
    if weights == "none":  # untrained statistics are 0 and 1; give the fold something to fold
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    x = torch.randn(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    found = find_pairs(net, x)
    assert len(found) == pairs == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(m.training for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    ref64 = _logits_and_grads(copy.deepcopy(net).double(), x.double())
    plain = _logits_and_grads(net, x)
    with folded(found):
        fold = _logits_and_grads(net, x)
    torch.testing.assert_close(fold[0], plain[0], rtol=1e-4, atol=1e-5)
    for name, g in ref64[1].items():  # as close to float64 as the plain fp32 model is, give or take rounding
        err_fold = (fold[1][name].double() - g).norm() / g.norm().clamp_min(1e-30)
        err_plain = (plain[1][name].double() - g).norm() / g.norm().clamp_min(1e-30)
        assert err_fold <= 10 * err_plain + 1e-5, name


def test_the_model_is_as_it_was_after_the_block_and_its_state_dict_never_changes():
    net = train_mode(create_model("efficientnet_lite0", 3, "imagenet"))
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    pairs = find_pairs(net, x)
    with folded(pairs):
        assert list(net.state_dict()) == keys
        assert all("forward" in conv.__dict__ for conv, _ in pairs)
    assert not any("forward" in m.__dict__ or "_tledge_folded_into" in m.__dict__ for m in net.modules())
    assert list(net.state_dict()) == keys


def test_a_training_batchnorm_refuses_to_fold():
    net = train_mode(create_model("efficientnet_lite0", 3, "imagenet"))
    x = torch.randn(2, 3, 32, 32)
    pairs = find_pairs(net, x)
    net.train()  # BatchNorm in training mode: batch statistics, nothing fixed to fold
    with folded(pairs), pytest.raises(RuntimeError, match="training mode cannot be folded"):
        net(x)


def test_only_a_batchnorm_fed_by_a_convolution_pairs():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    pairs = find_pairs(net, torch.randn(2, 3, 8, 8))
    assert pairs == [(net[3], net[4])]  # the first BatchNorm sees the ReLU's output
