"""The live planner's pure parts: reading metrics, the window's estimate, sizing, hysteresis."""

from __future__ import annotations

import pytest

from client.metrics import Slo
from launcher import cli
from planner.live import Hysteresis, LoadEstimate, Sample, Sizing, Split, parse_metrics
from tests.planner.test_simulator import calibration

METRICS = """\
# HELP disagg_orchestrator_requests_total requests received by the orchestrator
# TYPE disagg_orchestrator_requests_total gauge
disagg_orchestrator_requests_total{model="disaggregated_serving_bls",version="1"} 40
disagg_orchestrator_disaggregated_total{model="disaggregated_serving_bls",version="1"} 40
disagg_orchestrator_input_tokens_total{model="disaggregated_serving_bls",version="1"} 20000
disagg_orchestrator_output_tokens_total{model="disaggregated_serving_bls",version="1"} 160
disagg_orchestrator_context_phase_seconds_total{model="disaggregated_serving_bls",version="1"} 12
disagg_orchestrator_generation_phase_seconds_total{model="disaggregated_serving_bls",version="1"} 2.4
disagg_sequences_waiting{model="context",version="1"} 3
disagg_sequences_waiting{model="generation",version="1"} 1
disagg_router_workers{group="context",healthy="true",model="disaggregated_serving_bls",worker="context/1",version="1"} 1
"""


def test_metrics_text_is_read_by_name_and_labels():
    metrics = parse_metrics(METRICS)
    assert metrics["disagg_sequences_waiting"] == [({"model": "context", "version": "1"}, 3.0),
                                                   ({"model": "generation", "version": "1"}, 1.0)]
    assert metrics["disagg_router_workers"][0][0]["worker"] == "context/1"


def test_the_window_estimate_is_the_counters_difference():
    first = Sample(0.0, 0, 0, 0, 0, 0, 0, 0)
    load = LoadEstimate.between(first, Sample.from_metrics(parse_metrics(METRICS), 10.0))
    assert (load.rate, load.isl, load.osl, load.queue_depth) == (4.0, 500.0, 4.0, 4.0)
    assert load.ttft_ms == 300.0  # 12 s of context phase over 40 requests
    assert load.tpot_ms == 20.0  # 2.4 s over the 120 tokens after the first ones
    assert LoadEstimate.between(first, first).ttft_ms is None


def sizing(**changes) -> Sizing:
    cal = calibration(prefill_fixed_s=0.0, prefill_per_token_s=0.3 / 520, prefill_per_token_squared_s=0.0,
                      decode_batch_sizes=(1,), decode_base_s=(0.005,), decode_per_context_token_s=0.0,
                      kv_transfer_bytes_per_s=1e9, kv_transfer_latency_s=0.001)
    return Sizing(cal, Slo(800, 200), attainment=0.9, max_workers=3, **changes)


def load(rate: float) -> LoadEstimate:
    return LoadEstimate(rate, 520, 4, None, None, 0)


def test_long_prompts_at_a_high_rate_need_a_second_context_instance():
    assert sizing().recommend(load(4.0), Split(1, 1)) == Split(2, 1)
    assert sizing().recommend(load(0.0), Split(2, 1)) == Split(1, 1)  # nothing arrives: the minimum
    assert sizing().recommend(load(1.0), Split(2, 1)) == Split(1, 1)


def test_shrinking_needs_headroom():
    """At 2 req/s one context instance meets the SLOs, but not at 2 x 1.5: 2+1 stays."""
    assert sizing(headroom=0.5).recommend(load(2.0), Split(1, 1)) == Split(1, 1)
    assert sizing(headroom=0.5).recommend(load(2.0), Split(2, 1)) == Split(2, 1)


def test_no_split_meets_the_slos_then_the_most_goodput_at_the_limit():
    assert sizing().recommend(load(50.0), Split(1, 1)) == Split(2, 1)


def test_a_change_needs_a_streak_and_waits_out_the_cooldown():
    h = Hysteresis(Split(1, 1), polls=3, cooldown_s=10.0)
    assert [h.observe(Split(2, 1), t) for t in (0, 1)] == [None, None]
    assert h.observe(Split(1, 1), 2) is None  # the streak breaks
    assert [h.observe(Split(2, 1), t) for t in (3, 4)] == [None, None]
    assert h.observe(Split(2, 1), 5) == Split(2, 1) and h.current == Split(2, 1)
    assert [h.observe(Split(1, 1), t) for t in (6, 7, 8, 14)] == [None, None, None, None]  # cooling down
    assert h.observe(Split(1, 1), 15) == Split(1, 1)
    assert h.observe(Split(1, 2), 16) is None and h.observe(Split(2, 1), 17) is None  # a new candidate restarts
    assert h.streak == 1


def test_the_split_the_server_runs_counts_local_members_only():
    from planner.live import serving_split

    text = METRICS + "\n".join([
        'disagg_router_workers{group="context",healthy="false",model="m",worker="context/2",version="1"} 1',
        'disagg_router_workers{group="context",healthy="true",model="m",worker="context/3",version="1"} 0',
        'disagg_router_workers{group="generation",healthy="true",model="m",worker="generation/1",version="1"} 1',
        'disagg_router_workers{group="generation",healthy="true",model="m",worker="generation/1@h:8001",'
        'version="1"} 1'])
    assert serving_split(parse_metrics(text)) == Split(2, 1)
    assert serving_split({}) is None


@pytest.mark.parametrize(("argv", "prog"), [(["plan", "--live", "--help"], "disagg-serve plan --live"),
                                            (["plan", "--help"], "disagg-serve plan")])
def test_the_cli_sends_plan_live_to_the_live_planner_and_plan_to_the_offline_one(argv, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")
