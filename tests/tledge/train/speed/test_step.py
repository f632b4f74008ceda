"""A real training step under each path the probe can choose (tledge.train.speed.step): plain, with the speed-ups,
bf16 autocast, compiled; and what --compile on measures. Never timed: only what each step computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tledge.models import Net, create_model, train_mode
from tledge.train.config import FinetuneConfig
from tledge.train.phases import make_optimizer, param_groups
from tledge.train.speed import cache
from tledge.train.speed.choice import SpeedChoice
from tledge.train.speed.step import COMPARE_STEPS, TrainStep

CFG = FinetuneConfig(data="d", img_size=32)


def _choice(**kw) -> SpeedChoice:
    base = dict(device="cpu", precision="fp32", compile=False, threads=None, speedups=False)
    return SpeedChoice(**{**base, **kw})


def _one_step(net: nn.Module, choice: SpeedChoice, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    opt = make_optimizer(CFG, param_groups(net, CFG), fused=choice.speedups)
    step = TrainStep(net, net, choice, label_smoothing=0.1, example=x[:2])
    with step.active(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # the same dropout draws on every path
        loss, logits = step(opt, x, y)
    return loss, logits.detach()


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return train_mode(create_model("efficientnet_lite0", 3, "imagenet").to(memory_format=torch.channels_last))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.arange(8) % 3


def test_each_path_trains_lite0_one_step(lite0, batch):
    x, y = batch
    results = {}
    for name, choice in {"plain": _choice(), "speedups": _choice(speedups=True),
                         "bf16": _choice(precision="bf16"), "bf16+speedups": _choice(precision="bf16", speedups=True)}.items():
        net = copy.deepcopy(lite0)
        before = [p.detach().clone() for p in net.parameters()]
        results[name] = _one_step(net, choice, x, y)
        moved = sum(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        assert moved == len(before), f"{name}: {len(before) - moved} parameters did not train"
        assert torch.isfinite(torch.tensor(results[name][0])), name
    plain = results["plain"]
    torch.testing.assert_close(results["speedups"][1], plain[1], rtol=1e-4, atol=1e-4)  # exact math, fp32 rounding
    assert abs(results["speedups"][0] - plain[0]) < 1e-4
    assert abs(results["bf16"][0] - plain[0]) < 0.05 * abs(plain[0])  # bf16: close, not equal
    assert results["bf16"][1].dtype == torch.bfloat16  # the forward really ran in bf16


def test_speedups_leave_batchnorm_alone_when_it_trains(lite0, batch):
    net = copy.deepcopy(lite0).train()  # --train-bn: statistics move every step, nothing to fold
    step = TrainStep(net, net, _choice(speedups=True), label_smoothing=0.1, example=batch[0][:2])
    assert step.pairs == []
    train_mode(net)
    assert len(TrainStep(net, net, _choice(speedups=True), label_smoothing=0.1, example=batch[0][:2]).pairs) == 49


class _Tiny(nn.Module):
    """A two-block conv/BatchNorm/ReLU6 net (compiles in seconds, unlike Lite0): what the compiled path runs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.slow
def test_the_compiled_path_trains_and_compile_on_measures_itself(batch, monkeypatch, tmp_path):
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    net = train_mode(Net(_Tiny(), 8, 3))
    eager_net = copy.deepcopy(net)
    x, y = batch
    choice = _choice(compile=True, speedups=True, cache_key="test-key")
    opt = make_optimizer(CFG, param_groups(net, CFG), fused=True)
    step = TrainStep(net, net, choice, label_smoothing=0.1, example=x[:2], measure_compile=True)
    eager_opt = make_optimizer(CFG, param_groups(eager_net, CFG), fused=True)
    eager_step = TrainStep(eager_net, eager_net, _choice(speedups=True), label_smoothing=0.1, example=x[:2])
    net.dropout.p = eager_net.dropout.p = 0.0  # compiled dropout draws differ from eager ones
    with step.active(), eager_step.active():
        for _ in range(2 * COMPARE_STEPS + 1):  # the compile, then compiled and eager steps in turns
            loss, _ = step(opt, x, y)
            eager_loss, _ = eager_step(eager_opt, x, y)
            assert abs(loss - eager_loss) < 1e-4 * max(1.0, abs(eager_loss))  # the same training either way
        step(opt, x[:5], y[:5])  # a smaller last batch runs eagerly instead of compiling again
    measured = json.loads(cache.cache_file().read_text())["test-key"]["compile"]
    assert measured["seconds"] >= 0 and measured["images_per_s"] > 0 and measured["eager_images_per_s"] > 0
