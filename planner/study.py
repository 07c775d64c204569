"""The seed's study at scale, through the simulator: aggregated against every context:generation split.

    python -m planner.study_report --preset isl1024-osl256 [--workers 8,16,32,64] [--loads 0.5,1,2,4,8]
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

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from client.datasets import LengthDistribution, WorkloadClass, parse_mix
from client.metrics import RequestMeasurement, Slo, pareto_frontier, percentile
from planner.calibration import Calibration
from planner.predict import draw_requests
from planner.simulator import SchedulerLimits, SimulatedDeployment, Workload, simulate


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
    deployment = (SimulatedDeployment(aggregated_workers=workers, limits=limits) if context == 0
                  else SimulatedDeployment(context_workers=context, generation_workers=workers - context,
                                           limits=limits))
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


def comparisons(points: Sequence[StudyPoint], slo: Slo) -> list[Comparison]:
    return [compare(points, n, slo) for n in sorted({p.workers for p in points})]
