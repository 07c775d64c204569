"""Where one engine step's time goes: decode at several batch sizes and context lengths.

    python -m benchmarks.profile_engine [--batches 1,8,32] [--contexts 128,1024] [--threads 1] [--json out.json]

Each case fills the batch with sequences of the given context, then profiles decode steps with
torch.profiler and sorts the operators' own CPU time into the categories below; what no operator
accounts for is Python and host-side work (scheduler, index building, the sampler's bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_engine import prompt_of
from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.environment import resolve_model_dir

# Operator name fragments per category, first match wins.
CATEGORIES = {
    # A decode-only step on a CPU runs every layer in one C call: its products, attention and
    # elementwise work are one row here, and the GEMM row is the LM head's.
    "decode layers, one C call (cpu_kernels.decode_layers)": ("decode_layers",),
    "GEMM (projections, MLP, LM head)": ("linear", "addmm", "aten::mm", "matmul", "bmm", "packed_gemm"),
    "attention": ("scaled_dot_product", "_flash_attention", "softmax", "paged_attention"),
    "KV gather/write": ("index_copy", "aten::index", "index_select", "gather", "take"),
    "norms, RoPE, activations": ("rms_norm", "silu", "aten::mul", "aten::add", "aten::cat", "aten::neg", "aten::pow",
                                 "aten::rsqrt", "aten::mean", "aten::slice", "aten::chunk", "aten::view"),
    "sampling": ("argmax", "log_softmax", "multinomial", "topk", "sort"),
}
STEPS = 8


def categorize(name: str) -> str:
    for category, fragments in CATEGORIES.items():
        if any(fragment in name for fragment in fragments):
            return category
    return "other operators"


def profile_case(engine: LLMEngine, batch: int, context: int) -> dict[str, float]:
    """Milliseconds per decode step, by category."""
    for index in range(batch):
        engine.add_request(f"profile-{batch}-{context}-{index}", prompt_of(context, index),
                           SamplingParams(max_tokens=STEPS + 3, ignore_eos=True))
    while any(seq.num_computed < seq.num_prompt_tokens for seq in engine._sequences.values()):
        engine.step()  # prefill every prompt
    engine.step()  # one decode step outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(STEPS):
            engine.step()
        wall_ms = (time.perf_counter() - start) * 1e3 / STEPS
    while engine.has_unfinished():
        engine.step()
    times = dict.fromkeys([*CATEGORIES, "other operators"], 0.0)
    for event in profiler.key_averages():
        times[categorize(event.key)] += event.self_cpu_time_total / 1e3 / STEPS
    times["Python and host-side"] = max(0.0, wall_ms - sum(times.values()))
    times["step (wall)"] = wall_ms
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weight-quantization", default="", help="engine weight mode, e.g. int8")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    config = EngineConfig(model_dir=str(resolve_model_dir(args.model_dir or None)), num_threads=args.threads,
                          kv_cache_memory_bytes=max(batches) * max(contexts) * 64 * 1024,
                          max_num_seqs=max(batches), max_num_batched_tokens=8192,
                          weight_quantization=args.weight_quantization)
    engine = LLMEngine(config)
    results = {f"batch {b}, context {c}": profile_case(engine, b, c) for c in contexts for b in batches}
    names = list(next(iter(results.values())))
    header = "| ms per decode step | " + " | ".join(results) + " |"
    print(header)
    print("|---|" + "---:|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{case[name]:.1f}" for case in results.values()) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
