"""Fit a Calibration from measured benchmark runs: the engine as it was when they were taken.

    python -m planner.fit benchmarks/results --out benchmarks/calibration/cpu-2core-smollm2-135m-fp32.json

Only the quietest evidence for each term is used, so the rest of the runs are out of sample:
- prefill: TTFT of aggregated requests that met an idle worker (concurrency-1 runs, and the
  fastest request of each prompt length in the open-loop runs): TTFT = overhead + prefill(ISL);
- batch-1 decode: the median ITL of each concurrency-1 run against the mean context it decoded at;
- decode at larger batches: the TPOT of each request of the disaggregated concurrency sweeps
  against the mean batch its single generation worker decoded meanwhile (one slope per extra
  sequence, through the batch-1 point);
- KV transfer: the first ITL of a disaggregated concurrency-1 request (pull, then one decode step)
  less a decode step, against prompt length;
- the orchestrator's share: disaggregated concurrency-1 TTFT less aggregated, same prompt length.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from client.results import RunResult
from planner.calibration import Calibration

# SmolLM2-135M-Instruct: 30 layers x 3 KV heads x 64 dims, K and V, fp32.
DEFAULT_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4
DEFAULT_KV_CACHE_BYTES = 1 << 30  # EngineConfig.kv_cache_memory_bytes


def load_measured_runs(root: Path) -> dict[Path, RunResult]:
    """Every run result under root (files that are not one, such as a rate-match, are skipped)."""
    runs = {}
    for path in sorted(Path(root).rglob("*.json")):
        try:
            runs[path] = RunResult.load(path)
        except ValueError:
            continue
    return runs


def is_aggregated(run: RunResult) -> bool:
    return run.config.model == "ensemble_aggregated"


def fit_prefill(lengths: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """(per token squared, per token, fixed) of a prefill's time against its prompt length."""
    quadratic, linear, intercept = np.polyfit(lengths, seconds, 2) if len(lengths) > 2 else (-1.0, 0.0, 0.0)
    if quadratic < 0:  # too few lengths, or attention's cost hidden in the noise: linear in tokens
        quadratic, (linear, intercept) = 0.0, np.polyfit(lengths, seconds, 1)
    return float(quadratic), float(linear), float(intercept)


def decode_windows(run: RunResult, samples: int = 200) -> list[tuple[float, float, float]]:
    """(mean batch, mean context tokens in the batch, TPOT) over each request's decode on the one
    generation worker. Tokens reach the client in bursts there (many ITLs are 0), so each request
    is taken as progressing evenly from its first token to its last."""
    decoding = [r for r in run.requests if r.tpot_s is not None]
    windows = [(r.start_s + r.ttft_s, r.start_s + r.e2e_s, r.input_tokens, r.output_tokens) for r in decoding]
    result = []
    for request, (first, last, _, _) in zip(decoding, windows):
        batch = context = 0.0
        for k in range(samples):
            moment = first + (last - first) * (k + 0.5) / samples
            for other_first, other_last, prompt, outputs in windows:
                if other_first <= moment < other_last:
                    batch += 1
                    context += prompt + (outputs - 1) * (moment - other_first) / (other_last - other_first)
        result.append((batch / samples, context / samples, request.tpot_s))
    return result


def fit(runs: dict[Path, RunResult], source: str, command: str) -> Calibration:
    single = [run for run in runs.values() if run.config.concurrency == 1]
    idle_ttfts: dict[int, list[float]] = defaultdict(list)  # concurrency 1: every request met an idle worker
    open_loop_ttfts: dict[int, list[float]] = defaultdict(list)  # open loop: the fastest did
    for run in runs.values():
        if is_aggregated(run) and run.config.concurrency in (1, None):
            ttfts_by_length = idle_ttfts if run.config.concurrency == 1 else open_loop_ttfts
            for request in run.requests:
                if request.ttft_s is not None:
                    ttfts_by_length[request.input_tokens].append(request.ttft_s)
    lengths = sorted(set(idle_ttfts) | set(open_loop_ttfts))
    ttfts = [statistics.median(idle_ttfts[n]) if n in idle_ttfts else min(open_loop_ttfts[n]) for n in lengths]
    quadratic, linear, intercept = fit_prefill(lengths, ttfts)

    contexts = [r.input_tokens + r.output_tokens / 2 for run in single for r in run.requests if r.itl_s]
    medians = [statistics.median(r.itl_s) for run in single for r in run.requests if r.itl_s]
    per_context, batch1 = np.polyfit(contexts, medians, 1)
    per_context = max(float(per_context), 0.0)

    batches, excess = [], []  # per request: mean batch it decoded in, its TPOT less batch 1's at its context
    for run in runs.values():
        if not is_aggregated(run) and run.config.concurrency is not None:
            for batch, context, tpot in decode_windows(run):
                batches.append(batch)
                excess.append(tpot - per_context * context - batch1)
    weights = [(batch - 1) ** 2 for batch in batches]
    per_extra_sequence = (sum(e * (b - 1) for e, b in zip(excess, batches)) / sum(weights)) if sum(weights) else 0.0
    largest = max(2, math.ceil(max(batches, default=1)))

    pulls: dict[int, list[float]] = defaultdict(list)
    extra_ttft: list[float] = []
    aggregated_ttft = {run.requests[0].input_tokens: statistics.median([r.ttft_s for r in run.requests])
                       for run in single if is_aggregated(run)}
    for run in single:
        if is_aggregated(run):
            continue
        for request in run.requests:
            step = batch1 + per_context * (request.input_tokens + 1)
            pulls[request.input_tokens].append(request.itl_s[0] - step)
        if run.requests[0].input_tokens in aggregated_ttft:
            extra_ttft.append(statistics.median([r.ttft_s for r in run.requests])
                              - aggregated_ttft[run.requests[0].input_tokens])
    pull_lengths = sorted(pulls)
    pull_times = [max(statistics.median(pulls[length]), 0.0) for length in pull_lengths]
    seconds_per_token, latency = (np.polyfit(pull_lengths, pull_times, 1) if len(pull_lengths) > 1
                                  else (0.0, pull_times[0]))
    seconds_per_token = max(float(seconds_per_token), 1e-9)
    return Calibration(
        description="SmolLM2-135M-Instruct, fp32 weights and KV, 1 torch thread per pinned core, 2-core x86-64 "
        f"(AVX2) CPU; fitted from the {len(runs)} measured runs under {source}",
        command=command,
        prefill_fixed_s=0.0,
        prefill_per_token_s=float(linear),
        prefill_per_token_squared_s=float(quadratic),
        decode_batch_sizes=(1, largest),
        decode_base_s=(float(batch1), float(batch1 + per_extra_sequence * (largest - 1))),
        decode_per_context_token_s=per_context,
        kv_bytes_per_token=DEFAULT_KV_BYTES_PER_TOKEN,
        kv_transfer_latency_s=max(float(latency), 0.0),
        kv_transfer_bytes_per_s=DEFAULT_KV_BYTES_PER_TOKEN / seconds_per_token,
        request_overhead_s=float(intercept),
        disaggregated_overhead_s=max(statistics.mean(extra_ttft), 0.0) if extra_ttft else 0.0,
        kv_capacity_tokens=DEFAULT_KV_CACHE_BYTES // DEFAULT_KV_BYTES_PER_TOKEN,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a directory of measured runs (searched recursively)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = load_measured_runs(args.results)
    if not runs:
        parser.error(f"no run results under {args.results}")
    command = f"python -m planner.fit {args.results} --out {args.out}"
    calibration = fit(runs, str(args.results), command)
    calibration.save(args.out)
    print(f"{args.out}: {len(runs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
