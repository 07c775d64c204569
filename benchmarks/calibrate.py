"""Time the engine itself and write a calibration for this (model, device, dtype, threads).

    python -m benchmarks.calibrate --base benchmarks/calibration/cpu-2core-smollm2-135m-fp32.json \\
        --out benchmarks/calibration/FILE.json [--model-dir DIR] [--device cpu] [--threads 1]

Prefill: one prompt per length, one step each. Decode: a batch of sequences of equal context,
a few steps timed after their prefill, at several batch sizes and contexts. Both are fitted to
planner.calibration's model (prefill quadratic in the prompt, decode a base per batch size plus a
term per context token). The rest of a calibration is not engine time: the server's per-request
costs and the KV link are copied from --base (a calibration fitted from served runs by
planner.fit), and the description says so. Minutes on a CPU; the same command on a GPU box
(--device cuda) writes that box's engine terms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_engine import prompt_of
from planner.calibration import Calibration
from planner.fit import fit_prefill
from python_backend_utils.engine.config import DTYPES, EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.environment import resolve_model_dir

PREFILL_LENGTHS = (128, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16)
DECODE_CONTEXTS = (128, 1024)
DECODE_STEPS = 4


def prefill_seconds(engine: LLMEngine, length: int) -> float:
    engine.add_request(f"prefill-{length}", prompt_of(length, length), SamplingParams(max_tokens=1))
    start = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


def decode_step_seconds(engine: LLMEngine, batch: int, context: int) -> float:
    """The median of a few decode steps of `batch` sequences at about `context` tokens each."""
    for index in range(batch):
        engine.add_request(f"decode-{batch}-{context}-{index}", prompt_of(context, 1000 * batch + index),
                           SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True))
    engine.step()  # the whole batch's prefill: max_num_batched_tokens holds it
    times = []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times)


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * DTYPES[dtype].itemsize


def calibrate(base: Calibration, model_dir: Path, device: str, dtype: str, threads: int, command: str) -> Calibration:
    config = EngineConfig(model_dir=str(model_dir), device=device, dtype=dtype, num_threads=threads,
                          max_num_seqs=max(DECODE_BATCHES),
                          max_num_batched_tokens=max(max(DECODE_BATCHES) * max(DECODE_CONTEXTS), max(PREFILL_LENGTHS)))
    engine = LLMEngine(config)
    prefill_seconds(engine, 64)  # warm-up
    prefills = [prefill_seconds(engine, length) for length in PREFILL_LENGTHS]
    print("prefill s:", dict(zip(PREFILL_LENGTHS, (round(t, 4) for t in prefills))), flush=True)
    rows, seconds = [], []
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            seconds.append(decode_step_seconds(engine, batch, context))
            rows.append([1.0 if size == batch else 0.0 for size in DECODE_BATCHES] + [batch * (context + 2.0)])
            print(f"decode batch {batch}, context {context}: {seconds[-1] * 1000:.1f} ms", flush=True)
    # One intercept per batch size and a shared cost per context token.
    solution = np.linalg.lstsq(np.asarray(rows), np.asarray(seconds), rcond=None)[0]
    quadratic, linear, fixed = fit_prefill(list(PREFILL_LENGTHS), prefills)
    per_token = kv_bytes_per_token(model_dir, dtype)
    return replace(
        base,
        description=f"{model_dir.name}, {dtype}, {device}, {threads} thread(s): engine terms timed by "
        f"benchmarks.calibrate on this machine; request overheads and the KV link copied from {base.command!r}",
        command=command,
        prefill_fixed_s=max(fixed, 0.0),
        prefill_per_token_s=linear,
        prefill_per_token_squared_s=quadratic,
        decode_batch_sizes=DECODE_BATCHES,
        decode_base_s=tuple(float(value) for value in solution[:-1]),
        decode_per_context_token_s=max(float(solution[-1]), 0.0),
        kv_bytes_per_token=per_token,
        kv_capacity_tokens=config.kv_cache_memory_bytes // per_token,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="calibration whose server-side terms are kept")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.calibrate " + " ".join(sys.argv[1:] if argv is None else argv)
    calibration = calibrate(Calibration.load(args.base), resolve_model_dir(args.model_dir or None), args.device,
                            args.dtype, args.threads, command)
    calibration.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
