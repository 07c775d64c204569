"""The offline planner: split choice, the table, and the deployment file it writes."""

from __future__ import annotations

import pytest
import yaml

from client.metrics import Slo
from planner import plan
from planner.plan import Evaluation, PlanError, best, evaluate, render_deployment, smallest_meeting, splits
from planner.simulator import SimulatedDeployment, SimulatedRequest
from python_backend_utils.orchestration.deployment import Deployment
from tests.planner.test_simulator import calibration


def evaluation(context: int, generation: int, goodput: float, attainment: float) -> Evaluation:
    return Evaluation(SimulatedDeployment(context_workers=context, generation_workers=generation), goodput, attainment,
                      100.0, 10.0, 1.0)


def test_every_split_of_n_workers():
    assert [(d.context_workers, d.generation_workers) for d in splits(4)] == [(1, 3), (2, 2), (3, 1)]
    with pytest.raises(PlanError, match="at least 2"):
        splits(1)


def test_best_is_the_most_goodput_among_those_meeting_the_slos():
    candidates = [evaluation(1, 3, 0.9, 0.80), evaluation(2, 2, 0.7, 0.95), evaluation(3, 1, 0.6, 0.99)]
    assert best(candidates, 0.9) is candidates[1]  # 1+3 has more goodput but misses the attainment
    assert best(candidates, 0.5) is candidates[0]
    assert best(candidates, 1.0) is candidates[0]  # none meets: the most goodput


def test_ties_go_to_higher_attainment_then_fewer_context_workers():
    a, b, c = evaluation(1, 2, 0.5, 0.95), evaluation(2, 1, 0.5, 0.97), evaluation(2, 2, 0.5, 0.97)
    assert best([a, b], 0.9) is b
    assert best([c, b], 0.9) is b  # same goodput and attainment: fewer workers
    assert smallest_meeting([c, a, b], 0.9) is b
    assert smallest_meeting([a], 0.99) is None


def test_prefill_heavy_load_wants_more_context_workers():
    """Long prompts, one-token answers: the context side is the bottleneck, so the simulator gives
    the most goodput to the split with the most context workers."""
    cal = calibration(prefill_per_token_s=0.0005, kv_transfer_bytes_per_s=1e9)  # 1000 tokens: ~0.6 s of prefill
    requests = [SimulatedRequest(1000, 2)] * 60
    slo = Slo(ttft_ms=1500, tpot_ms=1000)
    evaluations = [evaluate(cal, d, requests, rate=3.0, slo=slo) for d in splits(4)]
    assert best(evaluations, 0.9).deployment.context_workers == 3
    assert evaluations[0].attainment < 0.5  # one context worker cannot keep up: 1.8 s of prefill per second


def test_the_deployment_file_keeps_the_base_and_validates():
    base = {"context_servers": {"num_instances": 1, "router": {"type": "round_robin"}},
            "generation_servers": {"num_instances": 1}, "context_timeout_s": 30, "watch_interval_s": 0.5}
    text = render_deployment(3, 2, base)
    raw = yaml.safe_load(text)
    assert raw["context_servers"] == {"num_instances": 3, "router": {"type": "round_robin"}}
    assert raw["context_timeout_s"] == 30 and base["context_servers"]["num_instances"] == 1
    parsed = Deployment.from_text(text)
    assert (parsed.context_servers.num_instances, parsed.generation_servers.num_instances) == (3, 2)
    assert Deployment.from_text(render_deployment(1, 1)).context_servers.router.type == "kv_cache_aware"
    with pytest.raises(PlanError, match="invalid"):
        render_deployment(1, 1, {"generation_servers": {"router": {"type": "random"}}})


def test_workload_specs():
    assert len(plan.parse_workload("mixed")) == 2
    (single,) = plan.parse_workload("512:32")
    assert (str(single.isl), str(single.osl)) == ("512", "32")
    with pytest.raises(PlanError, match="--workload"):
        plan.parse_workload("a:b:c:d")


def test_the_command_prints_the_table_and_writes_the_file(tmp_path, capsys):
    out = tmp_path / "deployment.yaml"
    status = plan.main(["--workload", "512:32", "--request-rate", "0.2", "--num-requests", "30",
                        "--slo-ttft-ms", "10000", "--slo-tpot-ms", "1000", "--workers", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "| 1 ctx + 2 gen |" in printed and "| 3 aggregated |" in printed and "best split:" in printed
    deployment = Deployment.load(out)
    assert deployment.context_servers.num_instances + deployment.generation_servers.num_instances == 3
