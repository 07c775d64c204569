"""The study's logic: frontiers, speed-ups at equal tok/s/user, the steady window and goodput, the best
split, the split search, and a tiny deterministic study whose best split is known in advance."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from client.datasets import LengthDistribution, WorkloadClass
from client.metrics import OK, RequestMeasurement, Slo
from planner.simulator import SchedulerLimits, SimulatedDeployment, SimulatedRequest, Workload, simulate
from planner.study import (
    StudyPoint,
    best_split,
    candidate_contexts,
    compare,
    frontier,
    lone_request,
    near_best,
    rate_matched_share,
    run_study,
    speedups,
    summarize_point,
    throughput_at,
)
from planner.study_report import main
from tests.planner.test_simulator import calibration

SLO = Slo(ttft_ms=1000.0, tpot_ms=100.0)


def point(x: float, y: float, context: int = 0, ttft_p90_ms: float = 500.0, goodput: float | None = None,
          load: float = 1.0, workers: int = 4) -> StudyPoint:
    return StudyPoint(
        workers=workers, context=context, load=load, concurrency=round(load * workers), requests=12, measured=4,
        throughput_per_worker=y, tokens_per_user=x, ttft_p50_ms=ttft_p90_ms, ttft_p90_ms=ttft_p90_ms,
        tpot_p50_ms=1000.0 / x, tpot_p90_ms=1000.0 / x, slo_attainment=1.0,
        goodput_per_worker=y if goodput is None else goodput,
    )


def test_the_frontier_drops_dominated_points_and_those_past_the_ttft_slo():
    points = [point(10, 1), point(5, 3), point(4, 2), point(2, 9, ttft_p90_ms=5000), point(1, 4), point(5.0001, 2.5)]
    assert [(p.tokens_per_user, p.throughput_per_worker) for p in frontier(points, SLO)] == [(1, 4), (5, 3), (10, 1)]


def test_throughput_at_a_speed_follows_the_frontier_s_lines():
    curve = [point(1, 4), point(5, 3), point(10, 1)]
    assert throughput_at(curve, 0.5) == 4  # slower than any point: the slowest (most throughput) serves it
    assert throughput_at(curve, 3) == pytest.approx(3.5)
    assert throughput_at(curve, 7.5) == pytest.approx(2)
    assert throughput_at(curve, 10) == 1
    assert throughput_at(curve, 11) is None


def test_speedups_compare_the_frontiers_only_where_both_reach():
    aggregated = [point(2, 4), point(8, 1)]
    disaggregated = [point(4, 6, context=1), point(12, 2, context=1)]
    ratios = speedups(aggregated, disaggregated)
    assert [x for x, _ in ratios] == [2, 4, 8]  # not 12: aggregated does not reach it
    assert [r for _, r in ratios] == pytest.approx([1.5, 2.0, 4.0])


def test_the_best_split_has_the_most_goodput_then_the_most_throughput():
    points = [point(5, 9, context=0, goodput=9), point(5, 3, context=1, goodput=2), point(5, 4, context=2, goodput=2),
              point(5, 8, context=3, goodput=1)]
    assert best_split(points).context == 2
    assert best_split([point(5, 9)]) is None


def test_near_best_splits_are_those_within_five_percent_of_the_best_goodput():
    points = [point(5, 9, context=0, goodput=9), point(5, 3, context=1, goodput=2.0),
              point(5, 3, context=2, goodput=1.91), point(5, 3, context=3, goodput=1.89)]
    assert near_best(points) == [1, 2]
    assert near_best([point(5, 3, context=1, goodput=0.0)]) == []


def test_splits_are_all_tried_up_to_the_limit_then_only_near_the_scaled_best():
    assert candidate_contexts(8, None, None, exhaustive_up_to=16) == list(range(1, 8))
    assert candidate_contexts(32, 16, 5, exhaustive_up_to=16) == [8, 9, 10, 11, 12]
    assert candidate_contexts(32, 16, 1, exhaustive_up_to=16) == [1, 2, 3, 4]
    assert candidate_contexts(32, 16, 15, exhaustive_up_to=16) == [28, 29, 30, 31]


def measurement(index: int, start: float, ttft: float, gaps: tuple[float, ...]) -> RequestMeasurement:
    return RequestMeasurement(index=index, status=OK, start_s=start, input_tokens=10, max_tokens=len(gaps) + 1,
                              output_tokens=len(gaps) + 1, ttft_s=ttft, e2e_s=ttft + sum(gaps), itl_s=gaps)


def test_a_point_measures_the_middle_requests_and_counts_goodput_in_tokens():
    # Concurrency 1, five requests one after the other: the first and the last are left out.
    runs = [measurement(0, 0.0, 0.5, (0.25,) * 3), measurement(1, 1.25, 0.5, (0.0625,) * 8),
            measurement(2, 2.25, 2.0, (0.0625,) * 3), measurement(3, 4.5, 0.5, (0.25,) * 3),
            measurement(4, 6.0, 0.5, (0.25,) * 2)]
    p = summarize_point(runs, workers=2, context=1, load=0.5, concurrency=1, slo=Slo(ttft_ms=1000, tpot_ms=100))
    assert p.measured == 3
    assert p.ttft_p50_ms == pytest.approx(500)
    assert p.tpot_p50_ms == pytest.approx(62.5)
    # Request 2 misses the TTFT, request 3 the TPOT: only request 1's 9 tokens of 17 are good.
    assert p.slo_attainment == pytest.approx(9 / 17)
    # Tokens reaching the client from 1.25 s (request 1's send) to 6 s (the last send): 1 + 9 + 4 + 4.
    assert p.throughput_per_worker == pytest.approx(18 / 4.75 / 2)
    assert p.goodput_per_worker == pytest.approx(p.throughput_per_worker * 9 / 17)


def test_a_lone_request_is_what_the_simulator_gives_one_request_on_one_worker():
    cal = calibration(request_overhead_s=0.03)
    classes = (WorkloadClass(1.0, LengthDistribution("fixed", 300), LengthDistribution("fixed", 20)),)
    limits = SchedulerLimits(max_num_batched_tokens=128)  # three prefill chunks
    lone = lone_request(cal, classes, limits)
    [m] = simulate(cal, SimulatedDeployment(aggregated_workers=1, limits=limits),
                   Workload((SimulatedRequest(300, 20),), concurrency=1))
    assert lone.ttft_s == pytest.approx(m.ttft_s)
    assert lone.tpot_s == pytest.approx(m.tpot_s)
    assert lone.e2e_s == pytest.approx(m.e2e_s)


def tiny_study(prefill_per_token_s: float) -> list[StudyPoint]:
    cal = calibration(prefill_fixed_s=0.0, prefill_per_token_s=prefill_per_token_s, prefill_per_token_squared_s=0.0,
                      decode_batch_sizes=(1, 16), decode_base_s=(0.05, 0.2), decode_per_context_token_s=0.0,
                      kv_transfer_latency_s=0.0)
    classes = (WorkloadClass(1.0, LengthDistribution("fixed", 200), LengthDistribution("fixed", 20)),)
    return run_study(cal, classes, workers=(4,), loads=(2.0,), slo=Slo(ttft_ms=60_000, tpot_ms=1_000),
                     limits=SchedulerLimits(), min_measured=16, seed="t", exhaustive_up_to=16, ramp_s=1.0)


def test_prefill_heavy_work_wants_context_workers_and_decode_heavy_work_generation_workers():
    # Prefill of 200 tokens: 2 s against 20 decode steps of 0.05-0.2 s shared by the batch.
    assert best_split(tiny_study(prefill_per_token_s=0.01)).context == 3
    # Prefill of 200 tokens: 0.02 s; the decode steps are nearly all the work.
    assert best_split(tiny_study(prefill_per_token_s=0.0001)).context == 1


def test_the_prefill_heavy_best_split_is_the_rate_matched_one():
    # 2 s of prefill against 19 decode steps of 0.05 s at batch 1: C/N = 2 / 2.95, so 3 of 4 workers.
    cal = calibration(prefill_fixed_s=0.0, prefill_per_token_s=0.01, prefill_per_token_squared_s=0.0,
                      decode_batch_sizes=(1, 16), decode_base_s=(0.05, 0.2), decode_per_context_token_s=0.0)
    classes = (WorkloadClass(1.0, LengthDistribution("fixed", 200), LengthDistribution("fixed", 20)),)
    share = rate_matched_share(cal, classes, SchedulerLimits(), batch=1)
    assert share == pytest.approx(2 / 2.95)
    assert best_split(tiny_study(prefill_per_token_s=0.01)).context == round(4 * share)


def test_a_study_is_deterministic_and_compares_like_with_like():
    first, second = tiny_study(0.01), tiny_study(0.01)
    assert first == second
    assert [p.context for p in first] == [0, 1, 2, 3]
    comparison = compare(first, 4, Slo(ttft_ms=60_000, tpot_ms=1_000))
    aggregated = next(p for p in first if p.aggregated)
    assert comparison.max_goodput_aggregated == aggregated.goodput_per_worker
    assert comparison.best_goodput_point.startswith("3:1")


def test_replot_redraws_the_plots_and_refreshes_the_comparisons_from_the_points(tmp_path, capsys):
    cal_path = tmp_path / "cal.json"
    calibration(prefill_fixed_s=0.0, prefill_per_token_s=0.01, prefill_per_token_squared_s=0.0).save(cal_path)
    points = tiny_study(prefill_per_token_s=0.01)
    study = tmp_path / "tiny.json"
    study.write_text(json.dumps({
        "command": "python -m planner.study_report (test)", "preset": "isl1024-osl256", "calibration": str(cal_path),
        "slo": {"ttft_ms": 60_000, "tpot_ms": 1_000}, "limits": {"max_num_seqs": 16, "max_num_batched_tokens": 4096},
        "comparisons": "stale", "points": [asdict(p) for p in points],
    }))
    assert main(["--replot", str(study)]) == 0
    assert (tmp_path / "tiny-pareto.png").stat().st_size > 0 and (tmp_path / "tiny-best-split.png").stat().st_size > 0
    [comparison] = json.loads(study.read_text())["comparisons"]
    assert comparison["workers"] == 4 and comparison["best_goodput_point"].startswith("3:1")
    assert "| 4 | 2 | 3:1 |" in capsys.readouterr().out
