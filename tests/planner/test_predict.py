"""planner.predict: the load generator's workloads through the simulator, out as a run result."""

from __future__ import annotations

from client.datasets import parse_mix, poisson_arrivals
from client.metrics import Slo
from client.results import RunResult
from planner import predict
from planner.simulator import SimulatedDeployment
from tests.planner.test_simulator import calibration


def test_classes_come_in_exact_proportions_and_arrivals_as_the_load_generator_sends_them():
    requests = predict.draw_requests(parse_mix("0.25:2048:32,0.75:128:64"), 16, "0-measured")
    assert sorted((r.input_tokens, r.output_tokens) for r in requests) == [(128, 64)] * 12 + [(2048, 32)] * 4
    result = predict.predict(calibration(), SimulatedDeployment(context_workers=1, generation_workers=1),
                             parse_mix("0.25:2048:32,0.75:128:64"), 16, 0, None, 0.2, Slo(), "test")
    assert sorted(m.start_s for m in result.requests) == poisson_arrivals(0.2, 16, "0-arrivals")


def test_a_predicted_sweep_point_is_a_run_result_with_goodput(tmp_path, capsys):
    out = tmp_path / "point.json"
    assert predict.main(["--context", "1", "--generation", "3", "--dataset", "mixed", "--request-rate", "0.2",
                         "--num-requests", "40", "--slo-ttft-ms", "15000", "--out", str(out)]) == 0
    result = RunResult.load(out)
    assert result.summary.completed == 40 and result.config.workers == 4
    assert 0 < result.summary.goodput_fraction <= 1
    assert str(out) in capsys.readouterr().out
