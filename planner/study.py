"""The seed's study at scale, through the simulator: aggregated against every context:generation split.

    python -m planner.study --preset isl1024-osl256 [--workers 8,16,32,64] [--loads 0.5,1,2,4,8]
        [--slo-ttft-ms MS --slo-tpot-ms MS] [--calibration FILE] [--out-dir benchmarks/results/study]
    disagg-serve study [same options]

For each total worker count N and each load (closed loop, as the seed's Pareto sweeps: a
concurrency per worker, so N * load requests in flight) it simulates N aggregated workers and
disaggregated C + G = N splits, all on the same requests. Each point gives the seed's two axes,
output tok/s per worker and tok/s/user (1 / median TPOT), its TTFT and TPOT percentiles, and
its goodput: the output tok/s per worker of the requests that met both SLOs. Per N, the
frontier of the aggregated points is compared with the frontier over all splits, counting only
points whose TTFT p90 meets the TTFT SLO (a split starved of context workers has a fine TPOT
and an unbounded TTFT); the best split at each load is the one with the most goodput.

Cost: every split is simulated up to --exhaustive-up-to workers (16); above that, only the
splits within 2 of each load's best split at the previous worker count, scaled to N (the
per-worker load is the same, so the best share C/N moves little). --exhaustive-up-to 64 checks it.
Each point runs max(3c, 2c + --min-measured) requests at concurrency c, the first c sent over a
lone request's E2E, and measures the middle ones: not the first c (the ramp), not the last c
(they finish while the load drains).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from client.datasets import LengthDistribution, WorkloadClass, parse_mix  # noqa: E402
from client.metrics import RequestMeasurement, Slo, pareto_frontier, percentile  # noqa: E402
from planner.calibration import Calibration  # noqa: E402
from planner.predict import draw_requests  # noqa: E402
from planner.simulator import Deployment, SchedulerLimits, Workload, simulate  # noqa: E402
from planner.validate import DEFAULT_CALIBRATION, REPO_ROOT  # noqa: E402


def _fixed(isl: int, osl: int) -> tuple[WorkloadClass, ...]:
    return (WorkloadClass(1.0, LengthDistribution("fixed", isl), LengthDistribution("fixed", osl)),)


# The mixed chat workload measured in section 1 of benchmarks/RESULTS.md (and replayed in section 6).
MEASURED_MIX = "0.25:2048:32,0.75:128:64"
# The seed's ISL/OSL settings, and that mix. Every class has fixed lengths: the closed forms below
# (lone_request, rate_matched_share) read a class's lengths as `isl.first` and `osl.first`.
PRESETS: dict[str, tuple[WorkloadClass, ...]] = {
    "isl8192-osl256": _fixed(8192, 256),
    "isl4400-osl1200": _fixed(4400, 1200),
    "isl1024-osl256": _fixed(1024, 256),
    "mixed": tuple(parse_mix(MEASURED_MIX)),
}
DEFAULT_WORKERS = (8, 16, 32, 64)
DEFAULT_LOADS = (0.5, 1.0, 2.0, 4.0, 8.0)  # requests in flight per worker
SLO_MULTIPLE = 3.0  # default SLOs: this many times a lone request's TTFT and TPOT on one worker
SEARCH_RADIUS = 2  # above --exhaustive-up-to, splits within this many context workers of the scaled best


@dataclass(frozen=True)
class StudyPoint:
    """One deployment at one load. `context` is 0 for aggregated."""

    workers: int
    context: int
    load: float  # concurrency per worker
    concurrency: int
    requests: int
    measured: int
    throughput_per_worker: float  # output tok/s per worker in the steady window
    tokens_per_user: float  # 1000 / median TPOT (ms)
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    slo_attainment: float  # share of the measured output tokens whose request met both SLOs
    goodput_per_worker: float  # throughput_per_worker * slo_attainment

    @property
    def aggregated(self) -> bool:
        return self.context == 0

    @property
    def split(self) -> str:
        return "agg" if self.aggregated else f"{self.context}:{self.workers - self.context}"

    def meets_ttft(self, slo: Slo) -> bool:
        return slo.ttft_ms is None or self.ttft_p90_ms <= slo.ttft_ms


def chunked_prefill_time(calibration: Calibration, tokens: int, chunk: int) -> float:
    """A lone prompt's prefill, in the scheduler's chunks of at most `chunk` tokens."""
    done, total = 0, 0.0
    while done < tokens:
        count = min(chunk, tokens - done)
        total += calibration.prefill_time(count, done)
        done += count
    return total


@dataclass(frozen=True)
class LoneRequest:
    """What one request alone on one aggregated worker gets, averaged over the workload's classes
    (TTFT: the longest prompt's, the one an SLO must allow)."""

    ttft_s: float
    tpot_s: float
    e2e_s: float


def lone_request(calibration: Calibration, classes: Sequence[WorkloadClass], limits: SchedulerLimits) -> LoneRequest:
    total = sum(c.weight for c in classes)
    isl = sum(c.weight * c.isl.first for c in classes) / total
    osl = sum(c.weight * c.osl.first for c in classes) / total
    longest = max(int(c.isl.first) for c in classes)
    chunk = limits.max_num_batched_tokens
    ttft = calibration.request_overhead_s + chunked_prefill_time(calibration, longest, chunk)
    tpot = calibration.decode_step_time(1, round(isl + osl / 2))
    prefill = calibration.request_overhead_s + chunked_prefill_time(calibration, round(isl), chunk)
    return LoneRequest(ttft, tpot, prefill + (osl - 1) * tpot)


def rate_matched_share(calibration: Calibration, classes: Sequence[WorkloadClass], limits: SchedulerLimits,
                       batch: int) -> float:
    """The seed's rate matching in closed form: the context share C/N at which C workers prefill as
    many requests per second as G workers finish decoding, each holding `batch` sequences."""
    total = sum(c.weight for c in classes)
    prefill = decode = 0.0
    for c in classes:
        isl, osl = int(c.isl.first), int(c.osl.first)
        prefill += c.weight / total * chunked_prefill_time(calibration, isl, limits.max_num_batched_tokens)
        step = calibration.decode_step_time(batch, round(batch * (isl + osl / 2)))
        decode += c.weight / total * (osl - 1) * step / batch
    return prefill / (prefill + decode)


def largest_batch(calibration: Calibration, classes: Sequence[WorkloadClass], limits: SchedulerLimits) -> int:
    """The most sequences of the longest class a generation worker holds: its KV cache or max_num_seqs."""
    longest = max(int(c.isl.first + c.osl.first) for c in classes)
    return max(1, min(limits.max_num_seqs, calibration.kv_capacity_tokens // longest))


def matched_shares(calibration: Calibration, classes: Sequence[WorkloadClass],
                   limits: SchedulerLimits) -> dict[int, float]:
    """Rate-matched context shares at generation batch 1 and at the largest batch that fits."""
    return {batch: rate_matched_share(calibration, classes, limits, batch)
            for batch in sorted({1, largest_batch(calibration, classes, limits)})}


def default_slo(lone: LoneRequest) -> Slo:
    """SLO_MULTIPLE times a lone request's TTFT and TPOT: scales with the calibration's device."""
    return Slo(ttft_ms=round(SLO_MULTIPLE * lone.ttft_s * 1000.0), tpot_ms=round(SLO_MULTIPLE * lone.tpot_s * 1000.0))


def token_times(m: RequestMeasurement) -> list[float]:
    """When each of the request's tokens reached the client, on the run's clock."""
    times = [m.start_s + m.ttft_s]
    for gap in m.itl_s:
        times.append(times[-1] + gap)
    return times


def summarize_point(measurements: Sequence[RequestMeasurement], workers: int, context: int, load: float,
                    concurrency: int, slo: Slo) -> StudyPoint:
    """The steady part of a closed-loop run: latencies of the requests after the first `concurrency`
    (the ramp) and before the last `concurrency` (they finish while the load drains); throughput from
    the tokens that reached the client while `concurrency` requests were in flight, from the first
    measured send to the last send of the run."""
    ordered = sorted(measurements, key=lambda m: m.index)
    measured = ordered[concurrency:len(ordered) - concurrency] or ordered
    start, end = measured[0].start_s, ordered[-1].start_s
    if end <= start:  # too few requests for a window: the whole run
        start, end = 0.0, max(m.start_s + m.e2e_s for m in ordered)
    emitted = sum(1 for m in ordered for t in token_times(m) if start <= t < end)
    throughput = emitted / (end - start) / workers
    tpots = [m.tpot_s * 1000.0 for m in measured if m.tpot_s is not None]
    ttfts = [m.ttft_s * 1000.0 for m in measured]
    tokens = sum(m.output_tokens for m in measured)
    good = sum(m.output_tokens for m in measured if slo.met_by(m)) if slo.any else tokens
    tpot_p50 = percentile(tpots, 50) if tpots else math.nan
    return StudyPoint(
        workers=workers, context=context, load=load, concurrency=concurrency, requests=len(ordered),
        measured=len(measured), throughput_per_worker=throughput,
        tokens_per_user=1000.0 / tpot_p50 if tpots and tpot_p50 > 0 else math.nan,
        ttft_p50_ms=percentile(ttfts, 50), ttft_p90_ms=percentile(ttfts, 90),
        tpot_p50_ms=tpot_p50, tpot_p90_ms=percentile(tpots, 90) if tpots else math.nan,
        slo_attainment=good / tokens, goodput_per_worker=throughput * good / tokens,
    )


def speed(point: StudyPoint) -> float:
    """tok/s/user to 3 significant digits: every deployment at batch 1 has the same TPOT up to float
    noise, and the frontier should then keep only the one with the most throughput."""
    return float(f"{point.tokens_per_user:.3g}")


def frontier(points: Iterable[StudyPoint], slo: Slo) -> list[StudyPoint]:
    """The points within the TTFT SLO that no other such point beats on both tok/s/user and
    tok/s per worker, by ascending tok/s/user."""
    eligible = [p for p in points if p.meets_ttft(slo) and not math.isnan(p.tokens_per_user)]
    by_xy = {(speed(p), p.throughput_per_worker): p for p in eligible}
    return [by_xy[xy] for xy in pareto_frontier(list(by_xy))]


def throughput_at(curve: Sequence[StudyPoint], tokens_per_user: float) -> float | None:
    """A frontier's tok/s per worker at `tokens_per_user`, on the line between its points, as the
    seed draws it (a step to the next point would credit whichever curve has a point just past the
    other's on a coarse load grid); its fastest point's below its range, None above."""
    if not curve or tokens_per_user > speed(curve[-1]):
        return None
    return float(np.interp(tokens_per_user, [speed(p) for p in curve], [p.throughput_per_worker for p in curve]))


def speedups(aggregated: Sequence[StudyPoint], disaggregated: Sequence[StudyPoint]) -> list[tuple[float, float]]:
    """(tok/s/user, disaggregated / aggregated tok/s per worker) at every frontier point's speed that
    both frontiers reach: the seed's "speedup at equal tok/s/user"."""
    ratios = []
    for x in sorted({speed(p) for p in [*aggregated, *disaggregated]}):
        agg, dis = throughput_at(aggregated, x), throughput_at(disaggregated, x)
        if agg and dis is not None:
            ratios.append((x, dis / agg))
    return ratios


def best_split(points: Iterable[StudyPoint]) -> StudyPoint | None:
    """The disaggregated point with the most goodput; ties (no split meets the SLOs) go to throughput."""
    splits = [p for p in points if not p.aggregated]
    return max(splits, key=lambda p: (p.goodput_per_worker, p.throughput_per_worker), default=None)


def near_best(points: Iterable[StudyPoint], share: float = 0.95) -> list[int]:
    """Context counts of the splits with at least `share` of the best split's goodput: at light load
    every split with enough generation workers serves the same, and the 'best' is a near tie."""
    splits = [p for p in points if not p.aggregated]
    best = best_split(splits)
    if best is None or best.goodput_per_worker <= 0:
        return []
    return sorted(p.context for p in splits if p.goodput_per_worker >= share * best.goodput_per_worker)


def candidate_contexts(workers: int, previous_workers: int | None, previous_best: int | None,
                       exhaustive_up_to: int) -> list[int]:
    """Context worker counts to simulate: all of 1..N-1, or those near the previous best scaled to N."""
    if workers <= exhaustive_up_to or previous_workers is None or previous_best is None:
        return list(range(1, workers))
    centre = round(previous_best * workers / previous_workers)
    return [c for c in range(centre - SEARCH_RADIUS, centre + SEARCH_RADIUS + 1) if 1 <= c < workers]


def simulate_point(calibration: Calibration, classes: Sequence[WorkloadClass], workers: int, context: int,
                   load: float, slo: Slo, limits: SchedulerLimits, min_measured: int, seed: str,
                   ramp_s: float) -> StudyPoint:
    """One deployment at one load, the first requests sent over `ramp_s`. The requests depend on the
    seed, N and the load only, so every split and the aggregated deployment of a (N, load) see the same."""
    concurrency = max(1, round(load * workers))
    count = max(3 * concurrency, 2 * concurrency + min_measured)
    requests = draw_requests(classes, count, f"{seed}-{workers}-{load:g}")
    deployment = (Deployment(aggregated_workers=workers, limits=limits) if context == 0
                  else Deployment(context_workers=context, generation_workers=workers - context, limits=limits))
    measurements = simulate(calibration, deployment, Workload(requests, concurrency=concurrency, ramp_s=ramp_s))
    return summarize_point(measurements, workers, context, load, concurrency, slo)


@dataclass(frozen=True)
class Comparison:
    """Aggregated against the best disaggregated split, for one worker count."""

    workers: int
    max_goodput_aggregated: float
    max_goodput_disaggregated: float
    best_goodput_point: str  # "C:G at load L" of the disaggregated maximum
    throughput_at_slo_aggregated: float | None  # tok/s per worker at tok/s/user >= 1000 / TPOT SLO
    throughput_at_slo_disaggregated: float | None
    max_speedup: float | None  # over the tok/s/user both frontiers reach
    max_speedup_at_tokens_per_user: float | None
    disaggregated_wins_from_tokens_per_user: float | None  # lowest speed where the ratio exceeds 1

    @property
    def goodput_ratio(self) -> float | None:
        return self.max_goodput_disaggregated / self.max_goodput_aggregated if self.max_goodput_aggregated else None


def compare(points: Sequence[StudyPoint], workers: int, slo: Slo) -> Comparison:
    mine = [p for p in points if p.workers == workers]
    aggregated = [p for p in mine if p.aggregated]
    disaggregated = [p for p in mine if not p.aggregated]
    agg_front, dis_front = frontier(aggregated, slo), frontier(disaggregated, slo)
    best = best_split(disaggregated)
    ratios = speedups(agg_front, dis_front)
    top = max(ratios, key=lambda r: r[1], default=None)
    slo_speed = 1000.0 / slo.tpot_ms if slo.tpot_ms else 0.0
    return Comparison(
        workers=workers,
        max_goodput_aggregated=max(p.goodput_per_worker for p in aggregated),
        max_goodput_disaggregated=best.goodput_per_worker,
        best_goodput_point=f"{best.split} at load {best.load:g}",
        throughput_at_slo_aggregated=throughput_at(agg_front, slo_speed),
        throughput_at_slo_disaggregated=throughput_at(dis_front, slo_speed),
        max_speedup=top[1] if top else None,
        max_speedup_at_tokens_per_user=top[0] if top else None,
        disaggregated_wins_from_tokens_per_user=min((x for x, r in ratios if r > 1.0), default=None),
    )


def run_study(calibration: Calibration, classes: Sequence[WorkloadClass], workers: Sequence[int],
              loads: Sequence[float], slo: Slo, limits: SchedulerLimits, min_measured: int, seed: str,
              exhaustive_up_to: int, ramp_s: float,
              progress: Callable[[str], None] | None = None) -> list[StudyPoint]:
    """Every point of the study, worker counts ascending."""
    points: list[StudyPoint] = []
    previous_workers: int | None = None
    previous_best: dict[float, int] = {}
    for n in sorted(workers):
        best_here: dict[float, int] = {}
        for load in loads:
            contexts = candidate_contexts(n, previous_workers, previous_best.get(load), exhaustive_up_to)
            here = [simulate_point(calibration, classes, n, c, load, slo, limits, min_measured, seed, ramp_s)
                    for c in [0, *contexts]]
            points += here
            best = best_split(here)
            if best is not None:
                best_here[load] = best.context
            if progress:
                progress(f"N={n} load={load:g}: {len(here)} deployments, best split "
                         f"{best.split if best else '-'}")
        previous_workers, previous_best = n, best_here
    return points


def best_splits_table(points: Sequence[StudyPoint]) -> str:
    lines = ["| workers | load (per worker) | best C:G | C within 5% | tok/s/worker | tok/s/user | TTFT p90 s "
             "| goodput/worker | aggregated tok/s/worker | aggregated tok/s/user | aggregated goodput/worker |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({p.workers for p in points}):
        for load in sorted({p.load for p in points if p.workers == n}):
            here = [p for p in points if p.workers == n and p.load == load]
            best, agg = best_split(here), next(p for p in here if p.aggregated)
            near = near_best(here)
            span = f"{near[0]}-{near[-1]}" if len(near) > 1 else "-"
            lines.append(f"| {n} | {load:g} | {best.split} | {span} | {best.throughput_per_worker:.2f} | "
                         f"{best.tokens_per_user:.2f} | {best.ttft_p90_ms / 1000:.1f} | "
                         f"{best.goodput_per_worker:.2f} | {agg.throughput_per_worker:.2f} | "
                         f"{agg.tokens_per_user:.2f} | {agg.goodput_per_worker:.2f} |")
    return "\n".join(lines)


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| workers | max goodput/worker agg | max goodput/worker disagg (split) | ratio | tok/s/worker at "
             "TPOT SLO agg / disagg | max speedup at equal tok/s/user | disagg wins from tok/s/user |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        at_slo = f"{num(c.throughput_at_slo_aggregated)} / {num(c.throughput_at_slo_disaggregated)}"
        speedup = f"{num(c.max_speedup)}x at {num(c.max_speedup_at_tokens_per_user)}" if c.max_speedup else "-"
        lines.append(f"| {c.workers} | {c.max_goodput_aggregated:.2f} | {c.max_goodput_disaggregated:.2f} "
                     f"({c.best_goodput_point}) | {num(c.goodput_ratio)} | {at_slo} | {speedup} | "
                     f"{num(c.disaggregated_wins_from_tokens_per_user)} |")
    return "\n".join(lines)


def pareto_figure(points: Sequence[StudyPoint], slo: Slo, title: str, path: Path) -> None:
    """One panel per worker count: the aggregated frontier against the frontier over all splits,
    every disaggregated point faint behind, the TPOT SLO as a vertical line."""
    counts = sorted({p.workers for p in points})
    columns = min(2, len(counts))
    rows = math.ceil(len(counts) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(7 * columns, 5 * rows), squeeze=False)
    for axes, n in zip(grid.flat, counts):
        mine = [p for p in points if p.workers == n]
        others = [p for p in mine if not p.aggregated and p.meets_ttft(slo)]
        axes.scatter([p.tokens_per_user for p in others], [p.throughput_per_worker for p in others],
                     color="tab:orange", alpha=0.2, s=12, label="splits within the TTFT SLO")
        for label, color, curve in (("aggregated", "tab:blue", frontier([p for p in mine if p.aggregated], slo)),
                                    ("disaggregated, best split", "tab:orange",
                                     frontier([p for p in mine if not p.aggregated], slo))):
            axes.plot([p.tokens_per_user for p in curve], [p.throughput_per_worker for p in curve], marker="o",
                      color=color, label=label)
            for p in curve:
                note = f"c{p.load:g}" if p.aggregated else f"{p.split} c{p.load:g}"
                axes.annotate(note, (p.tokens_per_user, p.throughput_per_worker), textcoords="offset points",
                              xytext=(4, 4), fontsize=7)
        if slo.tpot_ms:
            axes.axvline(1000.0 / slo.tpot_ms, color="grey", linestyle="--", label=f"TPOT SLO {slo.tpot_ms:g} ms")
        axes.set_title(f"{n} workers")
        axes.set_xlabel("tok/s/user (1 / median TPOT)")
        axes.set_ylabel("output tok/s per worker")
        axes.grid(True, alpha=0.3)
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=7)
    for axes in list(grid.flat)[len(counts):]:
        axes.set_visible(False)
    figure.suptitle(f"{title}\nfrontiers of the points with TTFT p90 <= {slo.ttft_ms:g} ms; "
                    "cL: L requests in flight per worker", fontsize=10)
    _save(figure, path)


def split_figure(points: Sequence[StudyPoint], matched: dict[int, float], title: str, path: Path) -> None:
    """The best split's context share C/N against the load, one line per worker count, and the
    rate-matched shares (batch -> share) as horizontal lines."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for batch, share in matched.items():
        axes.axhline(share, color="grey", linestyle=":", label=f"rate-matched, generation batch {batch}: {share:.2f}")
    for n in sorted({p.workers for p in points}):
        loads = sorted({p.load for p in points if p.workers == n})
        best = [best_split([p for p in points if p.workers == n and p.load == load]) for load in loads]
        axes.plot(loads, [b.context / n for b in best], marker="o", label=f"{n} workers")
        for b in best:
            axes.annotate(b.split, (b.load, b.context / n), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("requests in flight per worker")
    axes.set_ylabel("context share C / N of the best split (most goodput)")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(f"{title}\nbest context:generation split by load", fontsize=10)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _repo_path(path: Path) -> str:
    """The path relative to the repository when it lies inside, so the JSON reads the same on any checkout."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _numbers(text: str, kind: type) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="isl1024-osl256")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--workers", default=",".join(map(str, DEFAULT_WORKERS)), help="total worker counts")
    parser.add_argument("--loads", default=",".join(f"{x:g}" for x in DEFAULT_LOADS),
                        help="requests in flight per worker (closed loop)")
    parser.add_argument("--slo-ttft-ms", type=float, help=f"default: {SLO_MULTIPLE:g}x a lone request's TTFT")
    parser.add_argument("--slo-tpot-ms", type=float, help=f"default: {SLO_MULTIPLE:g}x a lone request's TPOT")
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerLimits.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerLimits.max_num_batched_tokens)
    parser.add_argument("--min-measured", type=int, default=16, help="fewest requests measured per point")
    parser.add_argument("--exhaustive-up-to", type=int, default=16, help="every split up to this many workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "study")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="no simulation: the tables, PNGs and the JSON's comparisons again from its points")
    args = parser.parse_args(argv)
    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        points = [StudyPoint(**{f.name: p[f.name] for f in fields(StudyPoint)}) for p in data["points"]]
        title = study_title(data["preset"], Path(data["calibration"]))
        matched = matched_shares(Calibration.load(REPO_ROOT / data["calibration"]), PRESETS[data["preset"]],
                                 SchedulerLimits(**data["limits"]))
        slo = Slo(**data["slo"])
        data["comparisons"] = comparison_records(points, slo)  # derived from the points: kept current
        args.replot.write_text(json.dumps(data, indent=1) + "\n")
        report(points, slo, matched, title, args.replot.parent, args.replot.stem, data["command"])
        return 0
    try:
        workers, loads = _numbers(args.workers, int), _numbers(args.loads, float)
        if not workers or min(workers) < 2 or not loads or min(loads) <= 0:
            raise ValueError("--workers wants counts >= 2 and --loads positive numbers")
        calibration = Calibration.load(args.calibration)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    classes = PRESETS[args.preset]
    limits = SchedulerLimits(args.max_num_seqs, args.max_num_batched_tokens)
    lone = lone_request(calibration, classes, limits)
    matched = matched_shares(calibration, classes, limits)
    fallback = default_slo(lone)
    slo = Slo(args.slo_ttft_ms if args.slo_ttft_ms is not None else fallback.ttft_ms,
              args.slo_tpot_ms if args.slo_tpot_ms is not None else fallback.tpot_ms)
    print(f"{args.preset} on {args.calibration.name}: SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms",
          file=sys.stderr, flush=True)
    began = time.perf_counter()
    points = run_study(calibration, classes, workers, loads, slo, limits, args.min_measured,
                       f"{args.seed}-{args.preset}", args.exhaustive_up_to, lone.e2e_s,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - began
    command = "python -m planner.study " + shlex.join(argv)
    title = study_title(args.preset, args.calibration)
    stem = f"{args.preset}-{args.calibration.stem}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({
        "command": command, "preset": args.preset, "workload": ", ".join(map(str, classes)),
        "calibration": _repo_path(args.calibration), "calibration_description": calibration.description,
        "slo": asdict(slo), "limits": asdict(limits), "workers": sorted(set(workers)), "loads": list(loads),
        "min_measured": args.min_measured, "ramp_s": round(lone.e2e_s, 3), "rate_matched_share": matched,
        "exhaustive_up_to": args.exhaustive_up_to, "seed": args.seed,
        "elapsed_s": round(elapsed, 1), "simulated_points": len(points),
        "comparisons": comparison_records(points, slo),
        "points": [{**asdict(p), "split": p.split} for p in points],
    }, indent=1) + "\n")
    print(f"{len(points)} points in {elapsed:.0f} s", file=sys.stderr)
    report(points, slo, matched, title, args.out_dir, stem, command)
    return 0


def study_title(preset: str, calibration: Path) -> str:
    return f"{preset}, simulated with {calibration.name}"


def comparisons(points: Sequence[StudyPoint], slo: Slo) -> list[Comparison]:
    return [compare(points, n, slo) for n in sorted({p.workers for p in points})]


def comparison_records(points: Sequence[StudyPoint], slo: Slo) -> list[dict]:
    return [{**asdict(c), "goodput_ratio": c.goodput_ratio} for c in comparisons(points, slo)]


def report(points: Sequence[StudyPoint], slo: Slo, matched: dict[int, float], title: str, out_dir: Path, stem: str,
           command: str) -> None:
    """The PNGs next to the study's JSON, and the tables on stdout."""
    pareto_figure(points, slo, title, out_dir / f"{stem}-pareto.png")
    split_figure(points, matched, title, out_dir / f"{stem}-best-split.png")
    shares = ", ".join(f"{share:.3f} at generation batch {batch}" for batch, share in matched.items())
    print(f"{command}\nSLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms; tok/s per worker; "
          f"goodput = tok/s per worker of the requests within both SLOs; rate-matched C/N {shares}\n")
    print(comparison_table(comparisons(points, slo)))
    print()
    print(best_splits_table(points))
    print(f"\nwrote {out_dir / stem}-pareto.png, -best-split.png")


if __name__ == "__main__":
    raise SystemExit(main())
