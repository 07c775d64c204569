"""`dtype: auto`: what it picks from a CPU's flags and a device, and how the engine config applies it."""

from __future__ import annotations

import pytest
import torch

from python_backend_utils.cpu_features import auto_dtype, cpu_flags
from python_backend_utils.engine.config import ConfigError, EngineConfig

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt aes xsave avx f16c fma"
# /proc/cpuinfo flag lines of four machine kinds this project has run on or may meet in CI.
AVX2_ONLY = f"{BASE} avx2 bmi1 bmi2 avx_vnni"
AVX512 = f"{AVX2_ONLY} avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
AVX512_BF16 = f"{AVX512} avx512_bf16"
AMX = f"{AVX512_BF16} amx_bf16 amx_tile amx_int8 avx512_fp16"


@pytest.mark.parametrize(("flags", "expected"), [
    (AVX2_ONLY, "float32"),  # no bf16 instructions: bf16 products ran slower than fp32
    (AVX512, "float32"),
    (AVX512_BF16, "bfloat16"),
    (AMX, "bfloat16"),
    (AMX.replace(" avx512_bf16", ""), "bfloat16"),  # AMX-BF16 alone is enough
])
def test_auto_picks_bf16_only_where_the_cpu_multiplies_it(flags, expected):
    assert auto_dtype("cpu", frozenset(flags.split())) == expected


@pytest.mark.parametrize("flags", [AVX2_ONLY, AMX])
def test_auto_is_bf16_on_cuda_whatever_the_cpu(flags):
    assert auto_dtype("cuda", frozenset(flags.split())) == "bfloat16"
    assert auto_dtype("cuda:1", frozenset(flags.split())) == "bfloat16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: {AMX}\n\n"
                       f"processor\t: 1\nflags\t\t: {AMX}\n")
    assert cpu_flags(cpuinfo) == frozenset(AMX.split())
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_engine_config_resolves_auto_for_this_machine_and_the_kv_follows():
    config = EngineConfig()
    assert config.dtype == "auto"
    expected = auto_dtype("cpu", cpu_flags())
    assert config.resolved_dtype == expected
    assert config.torch_dtype == config.kv_torch_dtype == getattr(torch, expected)
    assert f"dtype {expected} (auto: the CPU has" in config.describe()
    explicit = EngineConfig(dtype="float32", kv_cache_dtype="bfloat16")
    assert (explicit.torch_dtype, explicit.kv_torch_dtype) == (torch.float32, torch.bfloat16)
    assert "auto" not in explicit.describe()


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(ConfigError, match="choose auto or one of"):
        EngineConfig(dtype="fp32")
    with pytest.raises(ConfigError, match="leave it empty to follow dtype"):
        EngineConfig(kv_cache_dtype="auto")
