"""The probe's rules (tledge.train.speed.choice, .cpu): pure functions of options, CPU facts and measurements."""

from __future__ import annotations

import json

import pytest

from tledge.errors import ConfigError
from tledge.train.config import FinetuneConfig
from tledge.train.speed.choice import PLAIN, SpeedChoice, decide_compile, decide_precision, decide_threads
from tledge.train.speed.cpu import CpuFacts, parse_cpuinfo

AVX2 = CpuFacts("AMD EPYC", ("avx2",), cpus=2, cores=2)
SAPPHIRE = CpuFacts("Intel Xeon Platinum 8480+", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                                                  "amx_bf16"), cpus=8, cores=4)
COOPER = CpuFacts("Intel Xeon 8380H", ("avx2", "avx512f", "avx512_bf16"), cpus=4, cores=4)

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 2
physical id\t: 0
core id\t: 1
processor\t: 3
physical id\t: 0
core id\t: 1
"""


def test_cpuinfo_gives_model_flags_that_matter_and_physical_cores():
    facts = parse_cpuinfo(CPUINFO, cpus=4)
    assert facts.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert facts.flags == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    assert (facts.cpus, facts.cores) == (4, 2)  # two hyper-threads per core
    assert facts.native_bf16
    machine_c = parse_cpuinfo("model name\t: AMD EPYC\nflags\t: fpu avx avx2 fma\nphysical id\t: 0\ncore id\t: 0\n"
                              "physical id\t: 0\ncore id\t: 1\n", cpus=2)
    assert machine_c == AVX2 and not machine_c.native_bf16
    empty = parse_cpuinfo("", cpus=3)  # no /proc/cpuinfo (macOS): no flags, every CPU a core
    assert empty.flags == () and (empty.cpus, empty.cores) == (3, 3) and empty.model and not empty.native_bf16


@pytest.mark.parametrize("cpu", [AVX2, CpuFacts("x", ("avx2", "avx512f", "avx512_vnni"), 2, 2)])
def test_auto_is_fp32_without_bf16_in_hardware_and_never_measures(cpu):
    precision, why = decide_precision("auto", cpu, {"fp32_images_per_s": 1.0, "bf16_images_per_s": 9.0})
    assert precision == "fp32" and "no bf16 in hardware" in why


@pytest.mark.parametrize("cpu", [SAPPHIRE, COOPER])
def test_auto_is_bf16_in_hardware_only_where_it_measured_faster(cpu):
    assert decide_precision("auto", cpu, {"fp32_images_per_s": 10.0, "bf16_images_per_s": 18.0})[0] == "bf16"
    precision, why = decide_precision("auto", cpu, {"fp32_images_per_s": 10.0, "bf16_images_per_s": 10.5})
    assert precision == "fp32" and "1.05x" in why
    assert decide_precision("auto", cpu, {})[0] == "fp32"  # nothing measured: the safe side


def test_precision_options_override_the_rule():
    assert decide_precision("fp32", SAPPHIRE, {"fp32_images_per_s": 1.0, "bf16_images_per_s": 9.0})[0] == "fp32"
    precision, why = decide_precision("bf16", AVX2, {})
    assert precision == "bf16" and "emulated" in why


def test_compile_auto_pays_only_for_a_measured_saving_larger_than_the_compile():
    slower = {"seconds": 150.0, "images_per_s": 5.0, "eager_images_per_s": 10.0}  # machine C: compiled 0.5x
    assert decide_compile("auto", slower, 16_000, False)[0] is False
    faster = {"seconds": 100.0, "images_per_s": 20.0, "eager_images_per_s": 10.0}
    assert decide_compile("auto", faster, 16_000, False)[0] is True  # saves 800 s for 100 s
    compiled, why = decide_compile("auto", faster, 1_000, False)  # saves 50 s: not worth 100 s of compiling
    assert compiled is False and "would save 50s" in why
    assert decide_compile("auto", None, 10**9, False) == (False, "eager: compile not measured on this machine "
                                                                "(--compile on measures it once)")
    assert decide_compile("auto", faster, 16_000, True)[0] is False  # not with several processes
    assert decide_compile("on", slower, 1, True)[0] is True and decide_compile("off", faster, 10**9, False)[0] is False


def test_threads_one_per_core_unless_asked_or_hyperthreads_measured_faster():
    assert decide_threads(None, AVX2, None)[0] == 2
    assert decide_threads(None, SAPPHIRE, None)[0] == 4
    assert decide_threads(None, SAPPHIRE, {"4": 10.0, "8": 12.0})[0] == 8
    assert decide_threads(None, SAPPHIRE, {"4": 10.0, "8": 9.0})[0] == 4
    assert decide_threads(3, SAPPHIRE, {"4": 10.0, "8": 12.0}) == (3, "3 threads as asked")


def test_a_choice_says_itself_in_one_line_and_saves_as_plain_data():
    choice = SpeedChoice("cpu", "fp32", False, 2, True, ("fp32: no bf16 in hardware", "eager as asked"),
                         {"fold_error": {"logits": 1e-6, "gradients": 1e-3}}, "cached", "key", "passive")
    line = choice.line()
    assert "\n" not in line and line.startswith("fine-tuning on cpu: fp32, eager, 2 threads (idle ones sleep), "
                                                "speed-ups on (cached;")
    assert json.loads(json.dumps(choice.to_dict()))["reasons"] == ["fp32: no bf16 in hardware", "eager as asked"]
    assert "speed-ups off" in PLAIN.line()


@pytest.mark.parametrize("field, value, fragment", [("precision", "fp16", "unknown precision 'fp16'"),
                                                     ("compile", "maybe", "unknown compile mode 'maybe'"),
                                                     ("threads", 0, "--threads must be in 1..1024")])
def test_config_refuses_bad_speed_options_with_a_hint(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        FinetuneConfig(data="d", **{field: value}).validate()
    assert e.value.hint
