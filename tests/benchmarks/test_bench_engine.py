"""bench_engine's llama.cpp peer: what it reads from llama-bench and llama-batched-bench."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_engine import (
    DTYPE_MODES,
    LlamaCppError,
    batched_bench_decode_tps,
    llama_bench_prefill_tps,
    measure_llama_cpp,
)
from python_backend_utils.engine.config import EngineConfig

# llama-batched-bench's table for -npp 64 -ntg 32 -npl 1,8,32 (its log lines around it trimmed).
BATCHED_BENCH = """
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = 0, is_pp_shared = 0, n_gpu_layers = -1
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    64 |     32 |    1 |     96 |    0.262 |   244.27 |    1.013 |    31.59 |    1.275 |    75.29 |
|    64 |     32 |    8 |    768 |    2.103 |   243.46 |    2.420 |   105.78 |    4.523 |   169.80 |
|    64 |     32 |   32 |   3072 |    8.790 |   233.00 |    5.577 |   183.62 |   14.367 |   213.82 |
"""


def test_decode_rates_are_read_per_batch_from_the_batched_bench_table():
    assert batched_bench_decode_tps(BATCHED_BENCH) == {1: 31.59, 8: 105.78, 32: 183.62}


def test_prefill_rates_are_read_from_llama_bench_json():
    entries = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 230.5}, {"n_prompt": 2048, "n_gen": 0, "avg_ts": 212.9}]
    assert llama_bench_prefill_tps(json.dumps(entries)) == {512: 230.5, 2048: 212.9}
    with pytest.raises(LlamaCppError, match="not as expected"):
        llama_bench_prefill_tps("| model | size |")


def test_a_missing_build_says_how_to_make_one(tmp_path):
    with pytest.raises(LlamaCppError, match="peer-llama-cpp.sh"):
        measure_llama_cpp(tmp_path, threads=1, repeats=1)


def test_every_dtype_mode_is_a_valid_engine_config():
    for dtype, quantization in DTYPE_MODES.values():
        EngineConfig(dtype=dtype, weight_quantization=quantization)
