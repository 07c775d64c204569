"""Engine speed next to plain transformers in the same dtype and the memory-bandwidth bound, in one run.

    python -m benchmarks.bench_engine [--model-dir DIR] [--threads 1] [--dtype auto] [--repeats 3] [--json out.json]
        [--llama-cpp DIR]
    python -m benchmarks.bench_engine --served localhost:8001 [--streams 8]   # against a running server

Decode tokens/s at batch 1, 8 and 32 and prefill tokens/s at 512 and 2048 prompt tokens, for
the engine and for transformers in the same process (the ratio is what to read on a noisy
machine), each the best of --repeats runs taken in turns. --dtype: fp32, bf16, int8 (int8
weights, activations in what auto picks) or auto (the served default: bf16 on CPUs with AMX-BF16
or AVX512-BF16, fp32 elsewhere); transformers runs in the engine's activation dtype. The batch-1
bound is the weight bytes one step reads divided by this thread's read bandwidth.
--llama-cpp DIR adds llama.cpp's F32, BF16 and Q8_0 on the same weights, shapes and threads, from
a build that ../shared/tools/peer-llama-cpp.sh DIR made (a benchmark peer, never a dependency):
llama-bench for prefill, llama-batched-bench for decode (prompt 64, 32 steps).
--served measures what a user sees instead: N concurrent gRPC streams through
`ensemble_aggregated`, in output tokens per second.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import time
from pathlib import Path

import torch

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.environment import resolve_model_dir

PROMPT_LEN_FOR_DECODE = 64
DECODE_STEPS = 32
DECODE_BATCHES = (1, 8, 32)
PREFILL_LENGTHS = (512, 2048)
# --dtype -> (EngineConfig.dtype, weight_quantization)
DTYPE_MODES = {"fp32": ("float32", ""), "bf16": ("bfloat16", ""), "int8": ("auto", "int8"), "auto": ("auto", "")}
LLAMA_CPP_TYPES = ("F32", "BF16", "Q8_0")
LLAMA_CPP_TIMEOUT_S = 1800


class LlamaCppError(RuntimeError):
    """The llama.cpp build or its output is not what peer-llama-cpp.sh makes."""


def read_bandwidth_gbs(size_bytes: int = 512 << 20, repeats: int = 9) -> float:
    """Bytes per second one thread reads from a buffer larger than any cache (a sum over it), in
    the fastest of `repeats` reads: the bound for the best of each measure's runs."""
    source = torch.ones(size_bytes // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        source.sum()
        times.append(time.perf_counter() - start)
    return size_bytes / min(times) / 1e9


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


def engine_prefill_tps(engine: LLMEngine, length: int, salt: int) -> float:
    """A prompt of its own each run: a repeated one would be served from the prefix cache."""
    engine.add_request(f"prefill-{length}-{salt}", prompt_of(length, salt), SamplingParams(max_tokens=1))
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


def transformers_prefill_tps(model, length: int, salt: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(torch.tensor([prompt_of(length, salt)]))
    return length / (time.perf_counter() - start)


def make_engine(model_dir: str, threads: int, mode: str) -> LLMEngine:
    dtype, quantization = DTYPE_MODES[mode]
    return LLMEngine(EngineConfig(model_dir=model_dir, dtype=dtype, num_threads=threads,
                                  max_num_seqs=max(DECODE_BATCHES), max_num_batched_tokens=max(PREFILL_LENGTHS) * 2,
                                  weight_quantization=quantization))


def measure_engine(args) -> dict:
    from transformers import AutoModelForCausalLM

    model_dir = str(resolve_model_dir(args.model_dir or None))
    engine = make_engine(model_dir, args.threads, args.dtype)
    weight_bytes = engine.model.weight_bytes()
    bandwidth = read_bandwidth_gbs()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.config.torch_dtype)
    torch.set_num_threads(args.threads)
    engine_decode_tps(engine, 1)  # warm-up
    transformers_decode_tps(reference, 1)

    def row(measure: str, ours, theirs) -> dict:
        return side_by_side(measure, ours, theirs, args.repeats)

    rows = [row(f"decode tok/s, batch {b}", lambda b=b: engine_decode_tps(engine, b),
                lambda b=b: transformers_decode_tps(reference, b)) for b in DECODE_BATCHES]
    salts = itertools.count(1_000_000)
    rows += [row(f"prefill tok/s, {n} tokens", lambda n=n: engine_prefill_tps(engine, n, next(salts)),
                 lambda n=n: transformers_prefill_tps(reference, n, next(salts))) for n in PREFILL_LENGTHS]
    return {"model_dir": model_dir, "threads": args.threads, "repeats": args.repeats, "dtype": args.dtype,
            "engine": engine.config.describe(), "transformers_dtype": str(engine.config.torch_dtype),
            "read_bandwidth_gbs": bandwidth, "weight_bytes": weight_bytes,
            "decode_bound_tps": bandwidth * 1e9 / weight_bytes, "rows": rows}


def llama_cpp_run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=LLAMA_CPP_TIMEOUT_S).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise LlamaCppError(f"{' '.join(command)} failed: {error}") from None


def batched_bench_decode_tps(output: str) -> dict[int, float]:
    """Batch -> decode tok/s (S_TG) from llama-batched-bench's table: | PP | TG | B | N_KV | T_PP s | S_PP t/s |
    T_TG s | S_TG t/s | T s | S t/s |."""
    rates = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == str(PROMPT_LEN_FOR_DECODE) and cells[1] == str(DECODE_STEPS):
            rates[int(cells[2])] = float(cells[7])
    return rates


def llama_bench_prefill_tps(output: str) -> dict[int, float]:
    """Prompt length -> tok/s from llama-bench's JSON (-o json)."""
    try:
        return {entry["n_prompt"]: entry["avg_ts"] for entry in json.loads(output) if entry["n_gen"] == 0}
    except (ValueError, KeyError, TypeError) as error:
        raise LlamaCppError(f"llama-bench's JSON is not as expected ({error!r}): {output[:200]!r}") from None


def check_llama_cpp_build(directory: Path) -> Path:
    """The build's bin directory, if peer-llama-cpp.sh made the binaries and every model type there."""
    binaries = directory / "src" / "llama.cpp" / "build" / "bin"
    needed = [binaries / "llama-bench", binaries / "llama-batched-bench",
              *(directory / f"{kind.lower()}.gguf" for kind in LLAMA_CPP_TYPES)]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise LlamaCppError(f"no {', '.join(missing)}: run ../shared/tools/peer-llama-cpp.sh {directory} first")
    return binaries


def measure_llama_cpp(directory: Path, threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Type -> measure -> tok/s, for the measures measure_engine names."""
    binaries = check_llama_cpp_build(directory)
    results = {}
    for kind in LLAMA_CPP_TYPES:
        model = directory / f"{kind.lower()}.gguf"
        prefill = llama_bench_prefill_tps(llama_cpp_run([
            str(binaries / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", str(repeats),
            "-p", ",".join(map(str, PREFILL_LENGTHS)), "-n", "0", "-o", "json"]))
        decode = batched_bench_decode_tps(llama_cpp_run([
            str(binaries / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-tb", str(threads),
            "-c", "8192", "-b", "2048", "-ub", "512", "-npp", str(PROMPT_LEN_FOR_DECODE), "-ntg", str(DECODE_STEPS),
            "-npl", ",".join(map(str, DECODE_BATCHES))]))
        missing = [b for b in DECODE_BATCHES if b not in decode] + [n for n in PREFILL_LENGTHS if n not in prefill]
        if missing:
            raise LlamaCppError(f"llama.cpp {kind}: no result for {missing} in its output")
        results[kind] = {**{f"decode tok/s, batch {b}": decode[b] for b in DECODE_BATCHES},
                         **{f"prefill tok/s, {n} tokens": prefill[n] for n in PREFILL_LENGTHS}}
    return results


def side_by_side(measure: str, ours, theirs, repeats: int) -> dict:
    """Each side's best of `repeats` runs, the two taking turns: on a shared machine, load that comes
    and goes then falls on both alike, and the best run is the least disturbed one."""
    runs: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(repeats):
        runs["ours"].append(ours())
        runs["transformers"].append(theirs())
    return {"measure": measure, "ours": max(runs["ours"]), "transformers": max(runs["transformers"]),
            "ours_runs": runs["ours"], "transformers_runs": runs["transformers"]}


def print_engine(result: dict) -> None:
    print(f"model {result['model_dir']}: {result['weight_bytes'] / 1e6:.0f} MB of weights read per step; "
          f"engine --dtype {result['dtype']}: {result['engine']}; transformers in {result['transformers_dtype']}")
    print(f"read bandwidth {result['read_bandwidth_gbs']:.1f} GB/s -> batch-1 decode bound "
          f"{result['decode_bound_tps']:.1f} tok/s\n")
    peers = result.get("llama_cpp", {})
    header = "".join(f" {'llama.cpp ' + kind:>15} |" for kind in peers)
    print(f"| {'measure':<28} | {'ours':>8} | {'transformers':>12} | {'ours/tf':>7} |{header}")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 14}|{'-' * 9}|" + f"{'-' * 17}|" * len(peers))
    for row in result["rows"]:
        ours, theirs = row["ours"], row["transformers"]
        cells = "".join(f" {peers[kind][row['measure']]:15.1f} |" for kind in peers)
        print(f"| {row['measure']:<28} | {ours:8.1f} | {theirs:12.1f} | {ours / theirs:6.2f}x |{cells}")
    batch1 = result["rows"][0]["ours"]
    print(f"\nbatch-1 decode is at {batch1 / result['decode_bound_tps']:.0%} of the read-bandwidth bound")


async def served_decode_tps(url: str, streams: int, max_tokens: int) -> dict:
    """Streamed responses (one a token) per second of `streams` concurrent requests through ensemble_aggregated."""
    import tritonclient.grpc.aio as grpcclient_aio

    from client.generate import GenerateRequest, infer_inputs
    from client.load_generator import stream_request

    client = grpcclient_aio.InferenceServerClient(url)
    try:
        start = time.perf_counter()
        timings = await asyncio.gather(*(
            stream_request(client, "ensemble_aggregated", index, infer_inputs(
                GenerateRequest(f"Story number {index}: once upon a time", max_tokens=max_tokens, stream=True)
                .arrays(), protocol=grpcclient_aio))
            for index in range(streams)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    errors = [t.error for t in timings if t.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]}")
    responses = sum(len(t.response_times) for t in timings)
    return {"url": url, "streams": streams, "responses": responses, "seconds": elapsed,
            "output_tok_per_s": responses / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPE_MODES), default="auto",
                        help="the engine's mode; transformers runs in its activation dtype (default: auto)")
    parser.add_argument("--llama-cpp", type=Path, metavar="DIR",
                        help="also run llama.cpp F32/BF16/Q8_0 from a peer-llama-cpp.sh build in DIR")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measure, ours and transformers in turn")
    parser.add_argument("--served", metavar="GRPC_URL", help="measure a running server instead")
    parser.add_argument("--streams", type=int, default=8, help="with --served: concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=64, help="with --served: tokens per stream")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.served:
        result = asyncio.run(served_decode_tps(args.served, args.streams, args.max_tokens))
        print(f"{result['streams']} streams through ensemble_aggregated at {result['url']}: "
              f"{result['output_tok_per_s']:.1f} output tok/s ({result['responses']} responses "
              f"in {result['seconds']:.1f} s)")
    else:
        if args.llama_cpp:
            check_llama_cpp_build(args.llama_cpp)  # before minutes of measuring
        result = measure_engine(args)
        if args.llama_cpp:
            result["llama_cpp"] = measure_llama_cpp(args.llama_cpp, args.threads, args.repeats)
        print_engine(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
