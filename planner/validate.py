"""Replay the measured runs through the simulator; print predicted vs measured, then one JSON line.

    python -m planner.validate [--results benchmarks/results] [--calibration FILE]
    disagg-serve validate-simulator [same options]

Each run is replayed with its own requests (prompt and output lengths, in sending order), its
own load (the concurrency, or the recorded send times of the open-loop runs) and its own
deployment (N aggregated workers, or the presets' C context + G generation). The last line is a
JSON object with the median relative errors over the runs: p50 (TTFT and TPOT), p99 (TTFT and
TPOT) and output throughput. With --out-dir, each predicted run is written as a run result, so
`python -m client.benchmark plot` and client.results tables take it like a measured one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from client.metrics import RunSummary, summarize
from client.results import RunResult
from planner.calibration import Calibration
from planner.fit import is_aggregated, load_measured_runs
from planner.simulator import SimulatedDeployment, SimulatedRequest, Workload, simulate

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_CALIBRATION = REPO_ROOT / "benchmarks" / "calibration" / "cpu-2core-smollm2-135m-fp32.json"
P50_METRICS = ("ttft_p50", "tpot_p50")
P99_METRICS = ("ttft_p99", "tpot_p99")


@dataclass(frozen=True)
class Comparison:
    name: str
    measured: dict[str, float]
    predicted: dict[str, float]

    def relative_error(self, metric: str) -> float | None:
        if metric not in self.measured or metric not in self.predicted or self.measured[metric] == 0:
            return None
        return abs(self.predicted[metric] - self.measured[metric]) / self.measured[metric]


def deployment_of(run: RunResult) -> SimulatedDeployment:
    """The presets' deployments: N aggregated instances, or the workers split context first."""
    if is_aggregated(run):
        return SimulatedDeployment(aggregated_workers=run.config.workers)
    contexts = max(run.config.workers // 2, 1)
    return SimulatedDeployment(context_workers=contexts, generation_workers=max(run.config.workers - contexts, 1))


def workload_of(run: RunResult) -> Workload:
    requests = sorted(run.requests, key=lambda request: request.index)
    simulated = tuple(SimulatedRequest(r.input_tokens, r.max_tokens) for r in requests)
    if run.config.concurrency is not None:
        return Workload(simulated, concurrency=run.config.concurrency)
    return Workload(simulated, arrivals_s=tuple(r.start_s for r in requests))


def replay(run: RunResult, calibration: Calibration) -> RunResult:
    """The run as the simulator predicts it, in the shape client.results tabulates and plots."""
    measurements = simulate(calibration, deployment_of(run), workload_of(run))
    duration = max(m.start_s + m.e2e_s for m in measurements)
    config = replace(run.config, label=f"simulated {run.config.label}", url="simulator")
    return RunResult(config, summarize(measurements, duration, run.config.workers, run.summary.slo), measurements)


def metrics(summary: RunSummary) -> dict[str, float]:
    values = {"throughput": summary.output_throughput}
    for name, stats in (("ttft", summary.ttft_ms), ("tpot", summary.tpot_ms)):
        if stats is not None:
            values[f"{name}_p50"], values[f"{name}_p99"] = stats.p50, stats.p99
    return values


def compare(runs: dict[Path, RunResult], calibration: Calibration, root: Path,
            out_dir: Path | None = None) -> list[Comparison]:
    comparisons = []
    for path, run in runs.items():
        name = path.relative_to(root).with_suffix("")
        predicted = replay(run, calibration)
        if out_dir is not None:
            predicted.save(out_dir / name.with_suffix(".json"))
        comparisons.append(Comparison(str(name), metrics(run.summary), metrics(predicted.summary)))
    return comparisons


def median_error(comparisons: list[Comparison], names: tuple[str, ...]) -> float:
    errors = [e for c in comparisons for name in names if (e := c.relative_error(name)) is not None]
    return statistics.median(errors)


def table(comparisons: list[Comparison]) -> str:
    columns = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "throughput")
    lines = ["| run | " + " | ".join(f"{c} measured / predicted" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for comparison in comparisons:
        cells = []
        for column in columns:
            if column not in comparison.measured:
                cells.append("-")
                continue
            scale = 1000.0 if column.startswith("ttft") else 1.0  # TTFT in seconds, TPOT in ms, tok/s
            error = comparison.relative_error(column)
            cells.append(f"{comparison.measured[column] / scale:.2f} / {comparison.predicted[column] / scale:.2f}"
                         f" ({error:+.0%})".replace("+", "") if error is not None else "-")
        lines.append(f"| {comparison.name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="measured runs, searched recursively")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--out-dir", type=Path, help="also write each predicted run there, as a run result JSON")
    args = parser.parse_args(argv)
    runs = load_measured_runs(args.results)
    if not runs:
        parser.error(f"no run results under {args.results}")
    comparisons = compare(runs, Calibration.load(args.calibration), args.results, args.out_dir)
    print("TTFT in s, TPOT in ms, output throughput in tok/s; (relative error)")
    print(table(comparisons))
    print(json.dumps({
        "runs": len(comparisons),
        "p50_median_rel_error": round(median_error(comparisons, P50_METRICS), 4),
        "p99_median_rel_error": round(median_error(comparisons, P99_METRICS), 4),
        "throughput_median_rel_error": round(median_error(comparisons, ("throughput",)), 4),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
