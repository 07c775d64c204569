"""The simulator against closed forms: M/D/1 queueing, one batch's step times, chunked prefill,
the KV limit, and a disaggregated request's hand-off."""

from __future__ import annotations

import random

import pytest

from planner.calibration import Calibration
from planner.simulator import SchedulerLimits, SimulatedDeployment, SimulatedRequest, Workload, simulate


def calibration(**changes) -> Calibration:
    values = dict(
        description="test", command="test", prefill_fixed_s=0.01, prefill_per_token_s=0.001,
        prefill_per_token_squared_s=1e-7, decode_batch_sizes=(1, 4), decode_base_s=(0.05, 0.11),
        decode_per_context_token_s=1e-5, kv_bytes_per_token=1000, kv_transfer_latency_s=0.02,
        kv_transfer_bytes_per_s=1e6, request_overhead_s=0.0, disaggregated_overhead_s=0.0,
        kv_capacity_tokens=100_000,
    )
    return Calibration(**{**values, **changes})


def one_at_a_time(limits_seqs: int = 1) -> SimulatedDeployment:
    return SimulatedDeployment(aggregated_workers=1, limits=SchedulerLimits(max_num_seqs=limits_seqs))


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_one_worker_with_a_fixed_service_time_waits_as_m_d_1(load):
    service_s = 1.0  # a 1000-token prefill and nothing else: one output token each
    fixed = calibration(prefill_fixed_s=0.0, prefill_per_token_s=service_s / 1000, prefill_per_token_squared_s=0.0)
    rng, now, arrivals = random.Random(7), 0.0, []
    for _ in range(40_000):
        now += rng.expovariate(load / service_s)
        arrivals.append(now)
    workload = Workload(tuple(SimulatedRequest(1000, 1) for _ in arrivals), arrivals_s=tuple(arrivals))
    waits = [m.ttft_s - service_s for m in simulate(fixed, one_at_a_time(), workload)]
    expected = load / (2 * (1 / service_s) * (1 - load))  # Pollaczek-Khinchine, deterministic service
    assert sum(waits) / len(waits) == pytest.approx(expected, rel=0.08)


def behind_a_busy_worker(count: int, input_tokens: int, output_tokens: int) -> Workload:
    """`count` requests that arrive together while a first, one-token request is being prefilled:
    the engine starts a step as soon as a request reaches an idle worker, so these queue for the next."""
    requests = (SimulatedRequest(input_tokens, 1),) + (SimulatedRequest(input_tokens, output_tokens),) * count
    return Workload(requests, arrivals_s=(0.0,) + (0.001,) * count)


def test_a_batch_prefills_in_one_step_then_decodes_together():
    cal = calibration()
    _, *measured = simulate(cal, one_at_a_time(limits_seqs=3), behind_a_busy_worker(3, 100, 4))
    prefill = 3 * cal.prefill_time(100)
    steps = [cal.decode_step_time(3, 3 * (101 + k)) for k in range(3)]
    for m in measured:
        assert m.ttft_s == pytest.approx(cal.prefill_time(100) - 0.001 + prefill)
        assert m.itl_s == pytest.approx(steps)
        assert m.output_tokens == 4


def test_a_prompt_over_the_token_budget_is_prefilled_in_chunks():
    cal = calibration()
    deployment = SimulatedDeployment(aggregated_workers=1, limits=SchedulerLimits(max_num_batched_tokens=4096))
    [m] = simulate(cal, deployment, Workload((SimulatedRequest(5000, 2),), concurrency=1))
    assert m.ttft_s == pytest.approx(cal.prefill_time(4096) + cal.prefill_time(904, cached_tokens=4096))


def test_a_prompt_waits_until_its_kv_fits():
    cal = calibration(kv_capacity_tokens=250)
    _, first, second, third = simulate(cal, one_at_a_time(limits_seqs=3), behind_a_busy_worker(3, 100, 3))
    assert first.ttft_s == second.ttft_s == pytest.approx(cal.prefill_time(100) - 0.001 + 2 * cal.prefill_time(100))
    assert third.ttft_s > first.e2e_s


def test_a_full_kv_cache_preempts_the_newest_sequence_which_still_completes():
    cal = calibration(kv_capacity_tokens=205)  # two 100-token prompts fit, their decodes do not
    workload = Workload(tuple(SimulatedRequest(100, 8) for _ in range(2)), concurrency=2)
    first, second = simulate(cal, one_at_a_time(limits_seqs=2), workload)
    assert first.output_tokens == second.output_tokens == 8
    assert second.e2e_s > first.e2e_s + cal.prefill_time(100)  # recomputed after the first left


def test_a_disaggregated_request_gets_its_first_token_from_context_then_pulls_the_kv():
    cal = calibration(request_overhead_s=0.1, disaggregated_overhead_s=0.05)
    deployment = SimulatedDeployment(context_workers=1, generation_workers=1)
    [m] = simulate(cal, deployment, Workload((SimulatedRequest(1000, 3),), concurrency=1))
    assert m.ttft_s == pytest.approx(0.15 + cal.prefill_time(1000))
    assert m.itl_s == pytest.approx([cal.kv_transfer_time(1000) + cal.decode_step_time(1, 1001),
                                     cal.decode_step_time(1, 1002)])


def test_requests_spread_over_aggregated_workers():
    cal = calibration()
    workload = Workload(tuple(SimulatedRequest(100, 2) for _ in range(2)), concurrency=2)
    both = simulate(cal, SimulatedDeployment(aggregated_workers=2), workload)
    assert [m.ttft_s for m in both] == pytest.approx([cal.prefill_time(100)] * 2)


def test_a_deployment_is_one_kind_or_the_other():
    with pytest.raises(ValueError, match="not both"):
        SimulatedDeployment(aggregated_workers=1, context_workers=1, generation_workers=1)


def test_a_request_larger_than_the_kv_cache_is_refused_before_simulating():
    workload = Workload((SimulatedRequest(300, 10),), concurrency=1)
    with pytest.raises(ValueError, match="310 tokens cannot fit a worker's KV cache of 250"):
        simulate(calibration(kv_capacity_tokens=250), one_at_a_time(), workload)


def test_a_ramp_spreads_a_closed_loop_s_first_requests_then_keeps_the_loop_closed():
    workload = Workload(tuple(SimulatedRequest(100, 4) for _ in range(6)), concurrency=3, ramp_s=3.0)
    measured = simulate(calibration(), SimulatedDeployment(aggregated_workers=1), workload)
    assert [m.start_s for m in measured[:3]] == [0.0, 1.0, 2.0]
    ends = sorted(m.start_s + m.e2e_s for m in measured)
    assert [m.start_s for m in measured[3:]] == pytest.approx(ends[:3])  # each completion sends the next
    with pytest.raises(ValueError):
        Workload((SimulatedRequest(1, 1),), arrivals_s=(0.0,), ramp_s=1.0)
