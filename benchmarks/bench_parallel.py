"""Tensor and pipeline parallel engines next to one process, measured in one run.

    python -m benchmarks.bench_parallel [--model-dir DIR] [--repeats 3] [--splits tp1,tp2,pp2] [--json out.json]

Prefill tokens/s of a 2048-token prompt and decode tokens/s at batch 1 and 8 for each split, the
splits taking turns (each figure the best of --repeats runs: on a shared machine the best run is
the least disturbed one), and for a tensor-parallel split the all-reduce's share of a decode step
as the leader sees it (its wait for the slower rank included). Alone, the latency of one all-reduce
of a decode step's [batch, hidden] tensor between two processes, through gloo and through shared
memory (what a CPU group uses for tensors that fit its slots).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from benchmarks.bench_engine import engine_decode_tps, engine_prefill_tps
from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.parallel import AllReduce, ParallelModel, _process_group
from python_backend_utils.engine.shm_all_reduce import SharedMemoryAllReduce, create_region, slot_bytes
from python_backend_utils.environment import resolve_model_dir

SPLITS = {"tp1": {}, "tp2": {"tensor_parallel_size": 2}, "tp3": {"tensor_parallel_size": 3},
          "pp2": {"pipeline_parallel_size": 2}}
PREFILL_LENGTH = 2048
DECODE_BATCHES = (1, 8)
ALL_REDUCE_ROUNDS = 2000


def make_engine(model_dir: str, split: dict) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=model_dir, num_kv_blocks=512, max_num_seqs=max(DECODE_BATCHES),
                                  max_num_batched_tokens=PREFILL_LENGTH, **split))


def decode_with_all_reduce_share(engine: LLMEngine, batch: int) -> tuple[float, float | None]:
    """Decode tokens/s, and the share of the decode's time the leader spent in all-reduces (None: no TP)."""
    all_reduce = engine.model.local.all_reduce if isinstance(engine.model, ParallelModel) else None
    if all_reduce is None:
        return engine_decode_tps(engine, batch), None
    before = all_reduce.seconds
    started = time.perf_counter()
    tokens_per_s = engine_decode_tps(engine, batch)
    return tokens_per_s, (all_reduce.seconds - before) / (time.perf_counter() - started)


def all_reduce_latency_us(hidden_size: int, batches: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Median microseconds of one all-reduce of [batch, hidden_size] fp32 between this process and a peer,
    through gloo and through shared memory."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    slot = slot_bytes(max(batches), hidden_size)
    region = create_region(2, slot)
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_parallel", "--all-reduce-peer", str(store.port),
                             "--hidden-size", str(hidden_size), "--batches", ",".join(map(str, batches)),
                             "--region", str(region), "--slot", str(slot)], pass_fds=(region,))
    try:
        group = _process_group(store, 0, 2, "cpu")
        shared = SharedMemoryAllReduce(region, 0, 2, slot, peers_alive=lambda: peer.poll() is None, timeout_s=60)
        return {name: {str(batch): _median_us(reduce, torch.ones(batch, hidden_size)) for batch in batches}
                for name, reduce in (("gloo", AllReduce(group)), ("shared memory", AllReduce(group, shared)))}
    finally:
        peer.wait(timeout=300)


def _median_us(reduce: AllReduce, tensor: torch.Tensor) -> float:
    times = []
    for _ in range(ALL_REDUCE_ROUNDS):
        started = time.perf_counter()
        reduce(tensor)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e6


def _serve_all_reduce_peer(port: int, hidden_size: int, batches: list[int], region: int, slot: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=60))
    group = _process_group(store, 1, 2, "cpu")
    shared = SharedMemoryAllReduce(region, 1, 2, slot, peers_alive=lambda: True, timeout_s=60)
    for reduce in (AllReduce(group), AllReduce(group, shared)):
        for batch in batches:
            tensor = torch.ones(batch, hidden_size)
            for _ in range(ALL_REDUCE_ROUNDS):
                reduce(tensor)


def measure(args) -> dict:
    model_dir = str(resolve_model_dir(args.model_dir or None))
    engines = {name: make_engine(model_dir, SPLITS[name]) for name in args.splits}
    try:
        for engine in engines.values():
            engine_decode_tps(engine, 1)  # warm-up
        runs: dict[str, dict[str, list]] = {name: {} for name in engines}
        salts = itertools.count(1_000_000)
        for _ in range(args.repeats):
            for name, engine in engines.items():  # the splits take turns within each repeat
                prefill = engine_prefill_tps(engine, PREFILL_LENGTH, next(salts))
                runs[name].setdefault(f"prefill {PREFILL_LENGTH}", []).append(prefill)
                print(f"{name}: prefill {PREFILL_LENGTH} {prefill:.1f} tok/s", flush=True)
                for batch in DECODE_BATCHES:
                    tokens_per_s, share = decode_with_all_reduce_share(engine, batch)
                    runs[name].setdefault(f"decode batch {batch}", []).append(tokens_per_s)
                    if share is not None:
                        runs[name].setdefault(f"all-reduce share, batch {batch}", []).append(share)
                    print(f"{name}: decode batch {batch} {tokens_per_s:.1f} tok/s, all-reduce share {share}",
                          flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    hidden_size = next(iter(engines.values())).model.shape.hidden_size
    return {"model_dir": model_dir, "repeats": args.repeats, "runs": runs,
            "all_reduce_us": all_reduce_latency_us(hidden_size, DECODE_BATCHES)}


def print_result(result: dict) -> None:
    runs = result["runs"]
    names = list(runs)
    measures = list(dict.fromkeys(m for name in names for m in runs[name]))
    print(f"| measure | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for measure_name in measures:
        cells = []
        for name in names:
            values = runs[name].get(measure_name)
            if not values:
                cells.append("")
            elif measure_name.startswith("all-reduce"):
                cells.append(f"{min(values):.0%}-{max(values):.0%}")
            else:
                cells.append(f"{max(values):.1f}")
        print(f"| {measure_name} | {' | '.join(cells)} |")
    for name, latencies in result["all_reduce_us"].items():
        print(f"{name} all-reduce median latency, us: " + ", ".join(
            f"[{batch}, hidden] {us:.0f}" for batch, us in latencies.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--splits", default="tp1,tp2", help=f"comma-separated, of {', '.join(SPLITS)}")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--all-reduce-peer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hidden-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--region", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.all_reduce_peer:
        _serve_all_reduce_peer(args.all_reduce_peer, args.hidden_size, [int(b) for b in args.batches.split(",")],
                               args.region, args.slot)
        return
    args.splits = [s for s in args.splits.split(",") if s]
    result = measure(args)
    print_result(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
