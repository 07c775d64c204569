"""Choose the context:generation split for a workload and SLOs, and write it as a deployment file.

    disagg-serve plan --workload mixed --request-rate 0.3 --slo-ttft-ms 3000 --slo-tpot-ms 300 \\
        --workers 4 --out deployment.yaml
    disagg-serve plan --live --metrics-url localhost:8002 --deployment deployment.yaml --apply ...

Offline, every split C + G = N (and N aggregated instances, for comparison) serves the same
requests (lengths drawn from the workload, Poisson arrivals at the rate) in planner.simulator.
A split meets the SLOs when at least `--slo-attainment` of its requests are within both targets;
the best is the one with the most goodput (requests per second within the SLOs) among those,
ties going to the higher attainment, then to fewer context workers. Its deployment is written
in the `disagg_config.yaml` shape, keeping the routers and settings of a `--base` file.
`--live` (planner/live.py) does the same from a running server's metrics, repeatedly.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from client.datasets import DEFAULT_MIX, LengthDistribution, WorkloadClass, parse_mix, poisson_arrivals
from client.metrics import Slo, summarize
from client.results import RunResult
from planner.calibration import Calibration, CalibrationError
from planner.predict import draw_requests
from planner.simulator import SchedulerLimits, SimulatedDeployment, SimulatedRequest, Workload, simulate
from planner.validate import DEFAULT_CALIBRATION
from python_backend_utils.orchestration.deployment import Deployment, DeploymentError

DEFAULT_ATTAINMENT = 0.9
# A deployment the planner writes when no --base is given: the routers the benchmarks' presets use.
DEFAULT_BASE = {
    "context_servers": {"num_instances": 1, "router": {"type": "kv_cache_aware"}},
    "generation_servers": {"num_instances": 1, "router": {"type": "load_balancing", "load_metric": "tokens"}},
}


class PlanError(ValueError):
    """The plan cannot be made as asked; the message says which option to change."""


@dataclass(frozen=True)
class Evaluation:
    """One deployment's simulated run of the workload."""

    deployment: SimulatedDeployment
    goodput: float  # requests per second within the SLOs
    attainment: float  # fraction of the requests within the SLOs
    ttft_p90_ms: float
    tpot_p90_ms: float | None  # None when every answer is one token
    output_throughput: float

    def meets(self, target_attainment: float) -> bool:
        return self.attainment >= target_attainment

    @property
    def label(self) -> str:
        d = self.deployment
        return f"{d.aggregated_workers} aggregated" if d.aggregated_workers else \
            f"{d.context_workers} ctx + {d.generation_workers} gen"


def parse_workload(spec: str) -> list[WorkloadClass]:
    """`mixed` (client.datasets.DEFAULT_MIX), `ISL:OSL` (one class) or `WEIGHT:ISL:OSL,...`, fixed lengths."""
    if spec == "mixed":
        return parse_mix(DEFAULT_MIX)
    parts = spec.split(":")
    if len(parts) == 2:
        return [WorkloadClass(1.0, LengthDistribution.parse(parts[0]), LengthDistribution.parse(parts[1]))]
    try:
        return parse_mix(spec)
    except ValueError as error:
        raise PlanError(f"--workload {spec!r}: {error}; write mixed, ISL:OSL or WEIGHT:ISL:OSL,...") from None


def workload_requests(spec: str, count: int, seed: int) -> tuple[SimulatedRequest, ...]:
    """The workload's requests: drawn from a spec, or the lengths of a measured run (a result JSON)."""
    if spec.endswith(".json"):
        run = RunResult.load(Path(spec))
        requests = sorted(run.requests, key=lambda request: request.index)
        return tuple(SimulatedRequest(r.input_tokens, r.max_tokens) for r in requests)
    return draw_requests(parse_workload(spec), count, f"{seed}-measured")


def evaluate(calibration: Calibration, deployment: SimulatedDeployment, requests: Sequence[SimulatedRequest],
             rate: float, slo: Slo, seed: int = 0) -> Evaluation:
    arrivals = tuple(poisson_arrivals(rate, len(requests), f"{seed}-arrivals"))
    measured = simulate(calibration, deployment, Workload(tuple(requests), arrivals_s=arrivals))
    duration = max(max(m.start_s + m.e2e_s for m in measured), arrivals[-1])
    summary = summarize(measured, duration, deployment.workers, slo)
    return Evaluation(
        deployment=deployment,
        # A rate-limited run's goodput is the sending rate times attainment; the run's own
        # duration would reward the split that takes longest to drain its backlog less.
        goodput=rate * (summary.goodput_fraction or 0.0),
        attainment=summary.goodput_fraction or 0.0,
        ttft_p90_ms=summary.ttft_ms.p90 if summary.ttft_ms else float("inf"),
        tpot_p90_ms=summary.tpot_ms.p90 if summary.tpot_ms else None,
        output_throughput=summary.output_throughput,
    )


def splits(workers: int, limits: SchedulerLimits | None = None) -> list[SimulatedDeployment]:
    """Every C + G = workers with both at least 1, context count ascending."""
    limits = limits or SchedulerLimits()
    if workers < 2:
        raise PlanError(f"--workers {workers}: a disaggregated split needs at least 2 (1 context + 1 generation)")
    return [SimulatedDeployment(context_workers=c, generation_workers=workers - c, limits=limits)
            for c in range(1, workers)]


def best(evaluations: Sequence[Evaluation], target_attainment: float) -> Evaluation:
    """The most goodput among those that meet the SLOs (all, when none does); ties: higher
    attainment, then fewer workers, then fewer context workers."""
    meeting = [e for e in evaluations if e.meets(target_attainment)] or list(evaluations)
    return max(meeting, key=lambda e: (round(e.goodput, 9), round(e.attainment, 9), -e.deployment.workers,
                                       -e.deployment.context_workers))


def smallest_meeting(evaluations: Sequence[Evaluation], target_attainment: float) -> Evaluation | None:
    """The deployment with the fewest workers that meets the SLOs (ties: most goodput, then attainment)."""
    meeting = [e for e in evaluations if e.meets(target_attainment)]
    if not meeting:
        return None
    return min(meeting, key=lambda e: (e.deployment.workers, -round(e.goodput, 9), -round(e.attainment, 9),
                                       e.deployment.context_workers))


def table(evaluations: Sequence[Evaluation], chosen: Evaluation, target_attainment: float) -> str:
    lines = ["| deployment | goodput req/s | within SLO | TTFT p90 ms | TPOT p90 ms | output tok/s | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for e in evaluations:
        tpot = f"{e.tpot_p90_ms:.1f}" if e.tpot_p90_ms is not None else "-"
        mark = "best" if e is chosen else ("meets SLOs" if e.meets(target_attainment) else "")
        lines.append(f"| {e.label} | {e.goodput:.3f} | {e.attainment:.0%} | {e.ttft_p90_ms:.0f} | {tpot} | "
                     f"{e.output_throughput:.1f} | {mark} |")
    return "\n".join(lines)


def render_deployment(context: int, generation: int, base: dict | None = None) -> str:
    """A deployment file for C local context and G local generation instances: `base` (a parsed
    deployment file) with its instance counts replaced, everything else kept. Validated."""
    raw = copy.deepcopy(base if base is not None else DEFAULT_BASE)
    for key, count in (("context_servers", context), ("generation_servers", generation)):
        group = raw.get(key) or {}
        if not isinstance(group, dict):
            raise PlanError(f"{key} in the base deployment is not a mapping")
        group["num_instances"] = count
        raw[key] = group
    text = yaml.safe_dump(raw, sort_keys=False)
    try:
        Deployment.from_text(text)
    except DeploymentError as error:
        raise PlanError(f"the deployment for {context} + {generation} is invalid: {error}") from None
    return text


def load_base(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        Deployment.from_dict(raw)
    except (OSError, yaml.YAMLError, DeploymentError) as error:
        raise PlanError(f"--base {path}: {error}") from None
    return raw


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one step: a watcher never reads half a deployment."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """What offline and live planning share: the calibration, the SLOs, the engine limits."""
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION,
                        help="a planner.calibration file for this model and machine (default %(default)s)")
    parser.add_argument("--slo-ttft-ms", type=float, required=True)
    parser.add_argument("--slo-tpot-ms", type=float, required=True)
    parser.add_argument("--slo-attainment", type=float, default=DEFAULT_ATTAINMENT,
                        help="fraction of requests that must meet both SLOs (default %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerLimits.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerLimits.max_num_batched_tokens)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg-serve plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--workload", default="mixed",
                        help="mixed, ISL:OSL, WEIGHT:ISL:OSL,... or a run result JSON (default %(default)s)")
    parser.add_argument("--request-rate", type=float, required=True, help="requests per second (Poisson)")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--workers", type=int, required=True, help="engine instances to split")
    parser.add_argument("--base", type=Path, help="a deployment file whose routers and settings to keep")
    parser.add_argument("--out", type=Path, help="write the chosen deployment here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.request_rate <= 0 or args.num_requests < 1:
            raise PlanError("--request-rate must be above 0 and --num-requests at least 1")
        calibration = Calibration.load(args.calibration)
        limits = SchedulerLimits(args.max_num_seqs, args.max_num_batched_tokens)
        requests = workload_requests(args.workload, args.num_requests, args.seed)
        slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
        base = load_base(args.base)
        all_in_one = SimulatedDeployment(aggregated_workers=args.workers, limits=limits)
        candidates = [*splits(args.workers, limits), all_in_one]
        evaluations = [evaluate(calibration, d, requests, args.request_rate, slo, args.seed) for d in candidates]
        chosen = best(evaluations[:-1], args.slo_attainment)
        text = render_deployment(chosen.deployment.context_workers, chosen.deployment.generation_workers, base)
    except (OSError, CalibrationError, PlanError, ValueError) as error:
        print(f"disagg-serve plan: {error}", file=sys.stderr)
        return 2
    print(f"{len(requests)} requests ({args.workload}) at {args.request_rate:g} req/s; SLOs TTFT "
          f"{args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms for {args.slo_attainment:.0%} of requests; "
          f"{calibration.description}")
    print(table(evaluations, chosen, args.slo_attainment))
    aggregated = evaluations[-1]
    if aggregated.meets(args.slo_attainment) and aggregated.goodput > chosen.goodput:
        print(f"note: {aggregated.label} serves this better than any split "
              f"(disagg-serve --mode aggregated --set aggregated.instance_count={args.workers})")
    meets = chosen.meets(args.slo_attainment)
    print(f"best split: {chosen.label}" + ("" if meets else " (no split meets the SLOs at this rate: the one "
                                                            "with the most goodput)"))
    if args.out is not None:
        write_atomically(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0 if meets else 1


if __name__ == "__main__":
    raise SystemExit(main())
