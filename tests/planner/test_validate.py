"""`disagg-serve validate-simulator` replays every checked-in run and meets the issue's targets."""

from __future__ import annotations

import json

from client.results import load_runs, sweep_table
from launcher import cli
from planner import validate


def test_validate_simulator_replays_the_measured_runs_within_the_targets(capsys):
    assert cli.main(["validate-simulator"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["runs"] == 20
    assert sum(1 for line in lines if line.startswith("| isl") or line.startswith("| mixed")) == 20
    assert summary["p50_median_rel_error"] <= 0.20
    assert summary["p99_median_rel_error"] <= 0.35
    assert summary["throughput_median_rel_error"] <= 0.20


def test_predicted_runs_are_written_as_run_results_the_tables_take(tmp_path, capsys):
    assert validate.main(["--out-dir", str(tmp_path)]) == 0
    predicted = load_runs(tmp_path / "isl1024-osl256" / "aggregated")
    assert [run.config.concurrency for run in predicted] == [1, 2, 4]
    assert all(run.summary.completed == 6 and run.config.label == "simulated aggregated" for run in predicted)
    assert "| simulated aggregated | concurrency 4 | 6 |" in sweep_table(predicted)
