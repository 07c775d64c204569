"""Engine speed next to plain transformers and the memory-bandwidth bound, measured in one run.

    python -m benchmarks.bench_engine [--model-dir DIR] [--threads 1] [--json out.json]

Decode tokens/s at batch 1 and 8, prefill tokens/s at 512 and 2048 prompt tokens. The bound
for batch-1 decode is weight bytes per step divided by the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.environment import resolve_model_dir

PROMPT_LEN_FOR_DECODE = 64
DECODE_STEPS = 32


def copy_bandwidth_gbs(size_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read+write bandwidth of one thread copying a buffer larger than any cache."""
    source = torch.ones(size_bytes // 4)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times) / 1e9


def prompt_of(length: int, salt: int) -> list[int]:
    generator = torch.Generator().manual_seed(salt)
    return torch.randint(100, 40000, (length,), generator=generator).tolist()


def engine_decode_tps(engine: LLMEngine, batch: int) -> float:
    for index in range(batch):
        engine.add_request(
            f"decode-{batch}-{index}",
            prompt_of(PROMPT_LEN_FOR_DECODE, index),
            SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True),
        )
    engine.step()  # the prefill of the whole batch
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return batch * steps / (time.perf_counter() - start)


def engine_prefill_tps(engine: LLMEngine, length: int) -> float:
    engine.add_request(f"prefill-{length}", prompt_of(length, length), SamplingParams(max_tokens=1))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return length / (time.perf_counter() - start)


def transformers_decode_tps(model, batch: int) -> float:
    prompts = torch.tensor([prompt_of(PROMPT_LEN_FOR_DECODE, index) for index in range(batch)])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=DECODE_STEPS + 1, min_new_tokens=DECODE_STEPS + 1, do_sample=False)
        elapsed = time.perf_counter() - start - prefill
    return batch * DECODE_STEPS / elapsed


def transformers_prefill_tps(model, length: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(torch.tensor([prompt_of(length, length)]))
    return length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    model_dir = str(resolve_model_dir(args.model_dir or None))
    engine = LLMEngine(EngineConfig(model_dir=model_dir, num_threads=args.threads, max_num_batched_tokens=4096))
    weight_bytes = sum(
        t.numel() * t.element_size()
        for layer in engine.model.layers
        for t in vars(layer).values()
        if isinstance(t, torch.Tensor)
    ) + engine.model.lm_head.numel() * engine.model.lm_head.element_size()
    bandwidth = copy_bandwidth_gbs()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.set_num_threads(args.threads)

    engine_decode_tps(engine, 1)  # warm-up
    rows = [
        ("decode tok/s, batch 1", engine_decode_tps(engine, 1), transformers_decode_tps(reference, 1)),
        ("decode tok/s, batch 8", engine_decode_tps(engine, 8), transformers_decode_tps(reference, 8)),
        ("prefill tok/s, 512 tokens", engine_prefill_tps(engine, 512), transformers_prefill_tps(reference, 512)),
        ("prefill tok/s, 2048 tokens", engine_prefill_tps(engine, 2048), transformers_prefill_tps(reference, 2048)),
    ]
    bound = bandwidth * 1e9 / weight_bytes
    print(f"model {model_dir}: {weight_bytes / 1e6:.0f} MB of weights read per step, {args.threads} thread(s)")
    print(f"copy bandwidth {bandwidth:.1f} GB/s -> batch-1 decode bound {bound:.1f} tok/s\n")
    print(f"| {'measure':<28} | {'ours':>8} | {'transformers':>12} | {'ours/tf':>7} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 14}|{'-' * 9}|")
    for name, ours, theirs in rows:
        print(f"| {name:<28} | {ours:8.1f} | {theirs:12.1f} | {ours / theirs:6.2f}x |")
    batching_gain = rows[1][1] / rows[0][1]
    print(f"\ncontinuous batching: batch 8 gives {batching_gain:.1f}x the tokens/s of batch 1")
    print(f"batch-1 decode is at {rows[0][1] / bound:.0%} of the memory-bandwidth bound")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "copy_bandwidth_gbs": bandwidth,
                    "weight_bytes": weight_bytes,
                    "decode_bound_tps": bound,
                    "rows": [{"measure": n, "ours": o, "transformers": t} for n, o, t in rows],
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
