"""Predict a benchmark run without a server: the load generator's workload through the simulator.

    python -m planner.predict --aggregated 8 --dataset mixed --mix 0.25:2048:32,0.75:128:64 \\
        --request-rate 0.5 --num-requests 200 --out predicted/agg-8.json
    python -m planner.predict --context 3 --generation 5 --isl 4400 --osl 1200 --concurrency 16 ...

Requests are drawn the way `client.benchmark` draws them (classes in exact proportions,
shuffled; lengths from the same distributions), arrivals are its Poisson process with its seed
convention, and the result is a run result file: `client.benchmark plot` and the tables take it.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from client.datasets import DEFAULT_MIX, LengthDistribution, WorkloadClass, class_counts, parse_mix, poisson_arrivals
from client.metrics import Slo, summarize
from client.results import RunConfig, RunResult
from planner.calibration import Calibration
from planner.simulator import SchedulerLimits, SimulatedDeployment, SimulatedRequest, Workload, simulate
from planner.validate import DEFAULT_CALIBRATION


def draw_requests(classes: Sequence[WorkloadClass], count: int, seed: int | str) -> tuple[SimulatedRequest, ...]:
    """`count` requests, classes in exact proportions and shuffled, as client.datasets.build_requests."""
    rng = random.Random(seed)
    order = [index for index, n in enumerate(class_counts([c.weight for c in classes], count)) for _ in range(n)]
    rng.shuffle(order)
    return tuple(SimulatedRequest(classes[i].isl.sample(rng), classes[i].osl.sample(rng)) for i in order)


def predict(calibration: Calibration, deployment: SimulatedDeployment, classes: Sequence[WorkloadClass], count: int,
            seed: int, concurrency: int | None, rate: float | None, slo: Slo, label: str) -> RunResult:
    requests = draw_requests(classes, count, f"{seed}-measured")
    arrivals = None if rate is None else tuple(poisson_arrivals(rate, count, f"{seed}-arrivals"))
    measurements = simulate(calibration, deployment, Workload(requests, arrivals_s=arrivals, concurrency=concurrency))
    duration = max(m.start_s + m.e2e_s for m in measurements)
    config = RunConfig(
        label=label, url="simulator", model="ensemble_aggregated" if deployment.aggregated_workers else "ensemble",
        concurrency=concurrency, request_rate=rate, workload=", ".join(map(str, classes)), num_requests=count,
        warmup_requests=0, time_limit_s=duration, workers=deployment.workers, seed=seed, temperature=None,
        eos_suppressing_input=None,
    )
    return RunResult(config, summarize(measurements, duration, deployment.workers, slo), measurements)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--aggregated", type=int, default=0, help="aggregated workers")
    parser.add_argument("--context", type=int, default=0, help="context workers")
    parser.add_argument("--generation", type=int, default=0, help="generation workers")
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerLimits.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerLimits.max_num_batched_tokens)
    parser.add_argument("--dataset", choices=["single", "mixed"], default="single")
    parser.add_argument("--isl", default="1024", help="N, uniform:LOW:HIGH or normal:MEAN:STDDEV")
    parser.add_argument("--osl", default="256")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="WEIGHT:ISL:OSL,... (default %(default)s)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int)
    load.add_argument("--request-rate", type=float)
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ttft-ms", type=float)
    parser.add_argument("--slo-tpot-ms", type=float)
    parser.add_argument("--label", default="simulated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        deployment = SimulatedDeployment(args.aggregated, args.context, args.generation,
                                SchedulerLimits(args.max_num_seqs, args.max_num_batched_tokens))
        classes = (parse_mix(args.mix) if args.dataset == "mixed" else
                   [WorkloadClass(1.0, LengthDistribution.parse(args.isl), LengthDistribution.parse(args.osl))])
        result = predict(Calibration.load(args.calibration), deployment, classes, args.num_requests, args.seed,
                         args.concurrency, args.request_rate, Slo(args.slo_ttft_ms, args.slo_tpot_ms), args.label)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    result.save(args.out)
    s = result.summary
    print(f"{args.out}: {s.completed} requests, {s.output_throughput_per_worker:.2f} tok/s per worker, "
          f"TTFT p50 {s.ttft_ms.p50 / 1000:.2f} s, TPOT p50 {s.tpot_ms.p50 if s.tpot_ms else float('nan'):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
