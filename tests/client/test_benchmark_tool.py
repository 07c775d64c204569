"""The benchmark tool's logic without a server: metrics, goodput, rate matching, datasets, load control."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import pytest

from client.benchmark import main as benchmark_main
from client.datasets import (
    DEFAULT_MIX,
    BenchmarkRequest,
    LengthDistribution,
    PromptCutter,
    WorkloadClass,
    build_requests,
    class_counts,
    corpus_text,
    count_tokens,
    parse_mix,
    poisson_arrivals,
)
from client.load_generator import ModelInterface, ModelInterfaceError, StreamTiming, run_load
from client.metrics import CANCELLED, ERROR, OK, RequestMeasurement, Slo, pareto_frontier, percentile, summarize
from client.plots import Curve, Point, pareto_chart, tpot_chart
from client.rate_matching import ContextMeasurement, GenerationMeasurement, best_context, rate_match
from client.results import RunConfig, RunResult, run_table, sweep_table
from tests.helpers import REPO_ROOT


def done(index, ttft, e2e, tokens, itl=(), input_tokens=10, max_tokens=None) -> RequestMeasurement:
    return RequestMeasurement(
        index=index, status=OK, start_s=0.0, input_tokens=input_tokens, max_tokens=max_tokens or tokens,
        output_tokens=tokens, retokenized_output_tokens=tokens, ttft_s=ttft, e2e_s=e2e, itl_s=tuple(itl),
    )  # fmt: skip


# --- metrics -------------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks():
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7 -> 3 + 0.7
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([5], 99) == 5


def test_tpot_excludes_the_first_token():
    assert done(0, ttft=0.1, e2e=1.0, tokens=10).tpot_s == pytest.approx(0.1)  # 0.9 s / 9 tokens
    assert done(0, ttft=0.1, e2e=0.1, tokens=1).tpot_s is None


def test_summary_by_hand():
    requests = [
        done(0, ttft=0.2, e2e=1.2, tokens=11, itl=[0.1] * 10),  # TPOT 100 ms
        done(1, ttft=0.4, e2e=2.4, tokens=11, itl=[0.2] * 10),  # TPOT 200 ms
        done(2, ttft=3.0, e2e=3.3, tokens=4, itl=[0.1] * 3),  # TPOT 100 ms, TTFT over the SLO
        RequestMeasurement(3, ERROR, 0.0, 10, 8, error="boom"),
        RequestMeasurement(4, CANCELLED, 0.0, 10, 8),
    ]
    summary = summarize(requests, duration_s=10.0, workers=2, slo=Slo(ttft_ms=1000, tpot_ms=150))
    assert (summary.completed, summary.failed, summary.cancelled) == (3, 1, 1)
    assert summary.output_tokens == 26 and summary.input_tokens == 30
    assert summary.request_throughput == pytest.approx(0.3)
    assert summary.output_throughput == pytest.approx(2.6)
    assert summary.output_throughput_per_worker == pytest.approx(1.3)
    assert summary.tpot_ms.p50 == pytest.approx(100.0)
    assert summary.tpot_ms.mean == pytest.approx(400.0 / 3)
    assert summary.tokens_per_second_per_user == pytest.approx(10.0)  # 1 / 100 ms
    assert summary.ttft_ms.p50 == pytest.approx(400.0)
    assert summary.itl_ms.p50 == pytest.approx(100.0)  # 13 gaps of 100 ms, 10 of 200 ms
    assert summary.e2e_ms.p99 == pytest.approx(2400 + 0.98 * 900)
    # only request 0 meets both targets: 1 out of 5 sent, over 10 s
    assert summary.goodput == pytest.approx(0.1)
    assert summary.goodput_fraction == pytest.approx(0.2)


def test_goodput_absent_without_slo_and_one_token_answers_have_no_tpot_to_miss():
    summary = summarize([done(0, 0.5, 0.5, 1)], duration_s=1.0, workers=1, slo=Slo())
    assert summary.goodput is None and summary.tpot_ms is None and summary.tokens_per_second_per_user is None
    assert Slo(ttft_ms=600, tpot_ms=1).met_by(done(0, 0.5, 0.5, 1))
    assert not Slo(ttft_ms=400).met_by(done(0, 0.5, 0.5, 1))
    assert not Slo(ttft_ms=1e9).met_by(RequestMeasurement(0, ERROR, 0.0, 1, 1))


def test_pareto_frontier_keeps_only_undominated_points():
    points = [(1, 10), (2, 8), (3, 9), (4, 1), (3, 5)]
    assert pareto_frontier(points) == [(1, 10), (3, 9), (4, 1)]


# --- rate matching -------------------------------------------------------------------------


def test_rate_match_by_hand():
    # 2 context workers sustain 4 req/s together; the generation point completes 1.5 req/s.
    context = ContextMeasurement(num_workers=2, request_rate=4.0, ttft_p99_ms=900)
    point = rate_match(context, GenerationMeasurement("c8", num_workers=1, output_throughput=100.0,
                                                      request_rate=1.5, tokens_per_second_per_user=20.0))  # fmt: skip
    assert point.context_workers == pytest.approx(0.75)  # 2 * 1.5 / 4
    assert point.throughput_per_worker == pytest.approx(100.0 / 1.75)  # 57.142857...
    assert point.context_to_generation_ratio == pytest.approx(0.75)
    assert (point.load, point.tokens_per_second_per_user) == ("c8", 20.0)


def test_rate_match_with_several_generation_workers():
    context = ContextMeasurement(num_workers=1, request_rate=0.5, ttft_p99_ms=100)
    point = rate_match(context, GenerationMeasurement("c16", 2, 200.0, 2.0, 5.0))
    assert point.context_workers == pytest.approx(4.0)  # 1 * 2 / 0.5
    assert point.throughput_per_worker == pytest.approx(200.0 / 6.0)
    assert point.context_to_generation_ratio == pytest.approx(2.0)


def test_best_context_meets_the_ttft_limit_per_worker():
    runs = [
        ContextMeasurement(1, 2.0, ttft_p99_ms=500),
        ContextMeasurement(2, 5.0, ttft_p99_ms=900),  # 2.5 per worker: the best within 1 s
        ContextMeasurement(1, 4.0, ttft_p99_ms=3000),  # faster but over the limit
    ]
    assert best_context(runs, ttft_limit_ms=1000) == runs[1]
    with pytest.raises(ValueError):
        best_context(runs, ttft_limit_ms=100)


# --- datasets ------------------------------------------------------------------------------


def test_class_counts_are_exact_proportions():
    assert class_counts([0.2, 0.8], 40) == [8, 32]
    assert class_counts([1, 1, 1], 10) == [4, 3, 3]
    assert sum(class_counts([0.15, 0.35, 0.5], 7)) == 7


def test_length_specs():
    rng = random.Random(0)
    assert LengthDistribution.parse("128").sample(rng) == 128
    uniform = LengthDistribution.parse("uniform:64:80")
    assert all(64 <= uniform.sample(rng) <= 80 for _ in range(200))
    normal = LengthDistribution.parse("normal:100:10")
    assert abs(np.mean([normal.sample(rng) for _ in range(2000)]) - 100) < 2
    assert str(uniform) == "uniform:64:80"
    for bad in ("", "x", "uniform:80:64", "normal:10", "gamma:1:2", "uniform:0:5"):
        with pytest.raises(ValueError):
            LengthDistribution.parse(bad)
    assert [str(c) for c in parse_mix(DEFAULT_MIX)] == ["0.2:1024:32", "0.8:64:64"]
    with pytest.raises(ValueError):
        parse_mix("0.5:64")


@pytest.fixture(scope="module")
def cutter():
    from transformers import AutoTokenizer

    from python_backend_utils.environment import CheckpointNotFoundError, resolve_model_dir

    try:
        model_dir = resolve_model_dir()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))
    return PromptCutter(AutoTokenizer.from_pretrained(model_dir), corpus_text())


def test_prompts_have_exactly_the_requested_token_count(cutter):
    rng = random.Random(1)
    for length in (1, 2, 7, 64, 333, 1024, 2048):
        for _ in range(5):
            assert count_tokens(cutter.tokenizer, cutter.random_prompt(rng, length)) == length


def test_mixed_workload_is_seeded_exact_and_distinct(cutter):
    classes = parse_mix(DEFAULT_MIX)
    requests = build_requests(cutter, classes, 40, seed=3)
    assert sorted((r.input_tokens, r.max_tokens) for r in requests).count((1024, 32)) == 8
    assert all(count_tokens(cutter.tokenizer, r.prompt) == r.input_tokens for r in requests)
    assert len({r.prompt for r in requests}) == 40
    assert build_requests(cutter, classes, 40, seed=3) == requests
    assert build_requests(cutter, classes, 40, seed=4) != requests
    single = build_requests(cutter, [WorkloadClass(1, LengthDistribution.parse("uniform:16:32"),
                                                   LengthDistribution.parse("8"))], 10, seed=0)  # fmt: skip
    assert all(16 <= r.input_tokens <= 32 and r.max_tokens == 8 for r in single)


# --- load generation -----------------------------------------------------------------------


def metadata(shape: list[str], extra_inputs: list[dict] = ()) -> dict:
    inputs = [
        {"name": "text_input", "datatype": "BYTES", "shape": shape},
        {"name": "max_tokens", "datatype": "INT32", "shape": shape},
        {"name": "stream", "datatype": "BOOL", "shape": shape},
        {"name": "temperature", "datatype": "FP32", "shape": shape},
        {"name": "random_seed", "datatype": "UINT64", "shape": shape},
        *extra_inputs,
    ]
    outputs = [{"name": "text_output", "datatype": "BYTES", "shape": shape}]
    return {"name": "ensemble", "inputs": inputs, "outputs": outputs}


def test_inputs_follow_the_shapes_the_server_declares():
    request = BenchmarkRequest("héllo", input_tokens=3, max_tokens=16)
    for shape, expected in ((["1"], [1]), (["-1", "1"], [1, 1])):
        interface = ModelInterface.from_metadata(metadata(shape))
        tensors = {t.name(): t for t in interface.tensors(request, temperature=None, random_seed=0)}
        assert set(tensors) == {"text_input", "max_tokens", "stream"}
        assert all(t.shape() == expected for t in tensors.values())
        assert tensors["max_tokens"].datatype() == "INT32" and tensors["text_input"].datatype() == "BYTES"
    sampled = ModelInterface.from_metadata(metadata(["1"])).tensors(request, temperature=0.7, random_seed=9)
    assert {t.name() for t in sampled} == {"text_input", "max_tokens", "stream", "temperature", "random_seed"}


def test_end_token_suppression_uses_what_the_server_offers():
    assert ModelInterface.from_metadata(metadata(["1"])).eos_suppressing_input is None
    min_length = ModelInterface.from_metadata(
        metadata(["1"], [{"name": "min_length", "datatype": "INT32", "shape": ["1"]}])
    )
    assert min_length.eos_suppressing_input == "min_length"
    names = {t.name() for t in min_length.tensors(BenchmarkRequest("x", 1, 16), None, 0)}
    assert "min_length" in names
    ignore = ModelInterface.from_metadata(metadata(["1"], [{"name": "ignore_eos", "datatype": "BOOL", "shape": ["1"]}]))
    assert ignore.eos_suppressing_input == "ignore_eos"


def test_models_without_the_needed_tensors_are_refused():
    broken = metadata(["1"])
    broken["inputs"] = broken["inputs"][1:]
    with pytest.raises(ModelInterfaceError):
        ModelInterface.from_metadata(broken)
    no_temperature = metadata(["1"])
    no_temperature["inputs"] = no_temperature["inputs"][:3]
    with pytest.raises(ModelInterfaceError):
        ModelInterface.from_metadata(no_temperature).tensors(BenchmarkRequest("x", 1, 4), 0.5, random_seed=1)


def test_measurement_from_client_timestamps():
    request = BenchmarkRequest("x", input_tokens=5, max_tokens=3)
    timing = StreamTiming(7, sent_at=10.0, response_times=[10.5, 10.7, 11.0], final_at=11.1, text="abc")
    m = timing.measurement(request, phase_start=9.0, retokenized=2)
    assert (m.status, m.start_s, m.output_tokens, m.retokenized_output_tokens) == (OK, 1.0, 3, 2)
    assert m.ttft_s == pytest.approx(0.5) and m.e2e_s == pytest.approx(1.1)
    assert m.itl_s == pytest.approx((0.2, 0.3))
    assert m.tpot_s == pytest.approx(0.3)  # (1.1 - 0.5) / 2
    assert StreamTiming(0, 10.0, [10.5], cancelled=True).measurement(request, 9.0, 1).status == CANCELLED
    assert StreamTiming(0, 10.0, [], final_at=10.2).measurement(request, 9.0, 0).status == ERROR


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    arrivals = poisson_arrivals(4.0, 4000, seed="s")
    assert arrivals == poisson_arrivals(4.0, 4000, seed="s")
    assert all(later > earlier for earlier, later in zip(arrivals, arrivals[1:]))
    assert np.mean(np.diff([0.0, *arrivals])) == pytest.approx(0.25, rel=0.05)


def fake_sender(service_s: float, in_flight: list[int]):
    """Stands in for stream_request: takes service_s, records cancellation like it does."""

    async def send(index: int) -> StreamTiming:
        timing = StreamTiming(index, time.perf_counter(), [])
        in_flight.append(in_flight[-1] + 1)
        try:
            await asyncio.sleep(service_s)
            timing.response_times.append(time.perf_counter())
            timing.final_at = time.perf_counter()
        except asyncio.CancelledError:
            timing.cancelled = True
        finally:
            in_flight.append(in_flight[-1] - 1)
        return timing

    return send


def test_closed_loop_keeps_the_concurrency():
    in_flight = [0]
    phase = asyncio.run(run_load(fake_sender(0.02, in_flight), 7, 30.0, concurrency=3))
    assert [t.index for t in phase.timings] == list(range(7))
    assert max(in_flight) == 3 and not any(t.cancelled for t in phase.timings)


def test_runs_stop_at_the_time_limit_and_cancel_what_is_in_flight():
    in_flight = [0]
    phase = asyncio.run(run_load(fake_sender(30.0, in_flight), 10, 0.2, concurrency=2))
    assert phase.duration_s < 5 and len(phase.timings) == 2 and all(t.cancelled for t in phase.timings)
    phase = asyncio.run(run_load(fake_sender(0.01, [0]), 10, 0.3, arrivals=[0.0, 0.05, 0.1, 5.0, 6.0]))
    assert [t.index for t in phase.timings] == [0, 1, 2]  # later arrivals fall after the limit


# --- results and plots ---------------------------------------------------------------------


def test_results_round_trip_and_render(tmp_path):
    requests = [done(0, 0.2, 1.2, 11, [0.1] * 10), RequestMeasurement(1, CANCELLED, 0.5, 10, 8)]
    config = RunConfig("agg", "localhost:8001", "ensemble", 4, None, "isl 10, osl 11", 2, 1, 60.0, 1, 0, None, None)
    result = RunResult(config, summarize(requests, 2.0, 1, Slo(tpot_ms=150)), requests)
    result.save(tmp_path / "run.json")
    assert RunResult.load(tmp_path / "run.json") == result
    assert "| TPOT | 100.0 | 100.0 | 100.0 | 100.0 |" in run_table(result)
    assert "| agg | concurrency 4 | 1 |" in sweep_table([result])


def test_charts_are_written(tmp_path):
    curves = [
        Curve("aggregated", (Point(10, 8, "c1"), Point(6, 19, "c4"))),
        Curve("disaggregated", (Point(12, 9, "c1"), Point(9, 15, "c4"))),
        Curve("empty", ()),
    ]
    pareto_chart(curves, tmp_path / "pareto.png")
    tpot_chart(curves, tmp_path / "tpot.png")
    for name in ("pareto.png", "tpot.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rate_match_counts_only_the_workers_of_each_side(tmp_path):
    """A disaggregated preset records all its workers in each run; each side has only its own."""
    results = REPO_ROOT / "benchmarks" / "results" / "isl1024-osl256"
    out = tmp_path / "matched.json"
    assert benchmark_main(["rate-match", "--context", str(results / "context-only"), "--generation",
                           str(results / "disaggregated"), "--ttft-limit-ms", "20000", "--context-workers", "1",
                           "--generation-workers", "1", "--out", str(out)]) == 0
    matched = json.loads(out.read_text())
    assert matched["context"]["num_workers"] == 1
    for point in matched["points"]:
        assert point["generation_workers"] == 1
        assert point["throughput_per_worker"] == pytest.approx(
            point["output_throughput"] / (point["context_workers"] + 1))
