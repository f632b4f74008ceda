"""The probe at run start (tledge.train.speed.probe): measures only what a decision needs, once per machine."""

from __future__ import annotations

import json

import pytest
import torch

from tledge.models import create_model
from tledge.train.config import FinetuneConfig
from tledge.train.speed import cache, probe
from tledge.train.speed.cpu import CpuFacts

AVX2 = CpuFacts("AMD EPYC", ("avx2",), cpus=2, cores=2)
BF16 = CpuFacts("Intel Xeon 8480+", ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"), cpus=4, cores=2)
SIZE = 32


@pytest.fixture
def net():
    return create_model("efficientnet_lite0", 3, "imagenet").to(memory_format=torch.channels_last)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fresh cache and a CPU of the test's choosing (AVX2 only unless the test swaps it)."""
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path / "cache"))
    facts = {"cpu": AVX2}
    monkeypatch.setattr(probe, "read_cpu", lambda: facts["cpu"])
    return facts


def _choose(net, planned=1000, **options):
    cfg = FinetuneConfig(data="d", arch="efficientnet_lite0", img_size=SIZE, batch_size=8, **options)
    return probe.choose(net, cfg, torch.device("cpu"), SIZE, planned, distributed=False)


def test_first_run_measures_and_caches_later_runs_read_it(net, machine, monkeypatch):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    first = _choose(net)
    assert first.source == "measured" and first.precision == "fp32" and first.speedups and first.threads == 2
    assert probe.fold_matches(first.measured["fold_error"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # measured on a copy
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random draws are untouched
    stored = json.loads(cache.cache_file().read_text())
    assert list(stored) == [first.cache_key] and "avx2" in first.cache_key and "32px" in first.cache_key

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached choice measured again")

    monkeypatch.setattr(probe, "fold_error", no_measuring)
    second = _choose(net)
    assert second.source == "cached" and second.speedups
    assert second.to_dict()["reasons"] == first.to_dict()["reasons"]


def test_a_corrupt_cache_is_ignored_measured_again_and_rewritten(net, machine):
    path = cache.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00{ definitely not json")
    assert _choose(net).source == "measured"
    key = _choose(net).cache_key
    assert _choose(net).source == "cached"
    path.write_text(json.dumps({key: {"fold_error": "tiny", "compile": {"seconds": -1}}}))  # wrong shapes
    again = _choose(net)
    assert again.source == "measured" and isinstance(json.loads(path.read_text())[key]["fold_error"], dict)


def test_bf16_is_measured_and_chosen_only_on_a_cpu_with_it_in_hardware(net, machine, monkeypatch):
    calls = []

    def interleaved(model, size, configs):
        calls.append(configs)
        return [10.0, 16.0] if configs[0].get("precision") else [10.0, 9.0]

    monkeypatch.setattr(probe, "interleaved", interleaved)
    assert _choose(net).precision == "fp32" and calls == []  # AVX2 only: the rule, no measurement
    machine["cpu"] = BF16
    chosen = _choose(net)
    assert chosen.precision == "bf16" and chosen.measured["bf16_images_per_s"] == 16.0
    assert {"precision": "bf16"} in calls[0] and chosen.threads == 2  # hyper-threads measured slower here
    assert _choose(net, precision="fp32").precision == "fp32"  # the option wins over the measurement


def test_the_probe_times_real_steps(net, monkeypatch):
    monkeypatch.setattr(probe, "PROBE_ROUNDS", 1)
    monkeypatch.setattr(probe, "PROBE_STEPS", 1)
    threads = torch.get_num_threads()
    speeds = probe.interleaved(net, SIZE, [{"precision": "fp32"}, {"threads": 1}])
    assert len(speeds) == 2 and all(s > 0 for s in speeds)  # numbers, never judged here: no timed tests
    assert torch.get_num_threads() == threads  # measuring with one thread leaves the process as it was


def test_speedups_off_when_folding_does_not_match_or_when_asked(net, machine, monkeypatch):
    assert _choose(net, speedups=False).speedups is False
    monkeypatch.setattr(probe, "fold_error", lambda model, x: {"logits": 0.3, "gradients": 0.5})
    monkeypatch.setenv("TLEDGE_CACHE", str(cache.cache_file().parents[2] / "other"))
    chosen = _choose(net)
    assert chosen.speedups is False and "differs from the plain model" in chosen.line()


def test_a_wrong_fold_is_caught(net, monkeypatch):
    """The tolerance separates rounding from a real mistake: a fold that forgets BatchNorm's epsilon."""
    from tledge.train.speed import fold

    x = torch.randn(2, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    with probe._scratch(net) as scratch:
        assert probe.fold_matches(probe.fold_error(scratch, x))
        real = fold._folded_conv_forward

        def no_eps(self, x):
            bn = self.__dict__[fold._PAIRED]
            eps, bn.eps = bn.eps, 0.0
            try:
                return real(self, x)
            finally:
                bn.eps = eps

        monkeypatch.setattr(fold, "_folded_conv_forward", no_eps)
        assert not probe.fold_matches(probe.fold_error(scratch, x))


def test_nothing_is_measured_without_a_fine_tuning_phase(net, machine, monkeypatch):
    monkeypatch.setattr(probe, "fold_error", lambda *a: pytest.fail("measured for a head-only run"))
    chosen = _choose(net, planned=0)
    assert chosen.reasons[0] == "no fine-tuning phase" and not cache.cache_file().exists()


def test_a_gpu_run_keeps_its_amp_and_measures_nothing(net, machine, monkeypatch):
    monkeypatch.setattr(probe, "fold_error", lambda *a: pytest.fail("measured for a GPU run"))
    cfg = FinetuneConfig(data="d", img_size=SIZE)
    chosen = probe.choose(net, cfg, torch.device("cuda", 0), SIZE, 1000, distributed=False)
    assert (chosen.device, chosen.precision, chosen.threads) == ("cuda", "amp", None)
