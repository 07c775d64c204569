"""`disagg-serve validate-simulator` replays every checked-in run and meets the issue's targets."""

from __future__ import annotations

import json

from launcher import cli


def test_validate_simulator_replays_the_measured_runs_within_the_targets(capsys):
    assert cli.main(["validate-simulator"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["runs"] == 20
    assert sum(1 for line in lines if line.startswith("| isl") or line.startswith("| mixed")) == 20
    assert summary["p50_median_rel_error"] <= 0.20
    assert summary["p99_median_rel_error"] <= 0.35
    assert summary["throughput_median_rel_error"] <= 0.20
