"""A calibration survives its JSON; the checked-in one is what `planner.fit` makes of the runs."""

from __future__ import annotations

import dataclasses

import pytest

from planner.calibration import Calibration, CalibrationError
from planner.fit import fit, load_measured_runs
from planner.validate import DEFAULT_CALIBRATION, DEFAULT_RESULTS
from tests.planner.test_simulator import calibration


def test_a_calibration_round_trips_through_its_file(tmp_path):
    original = calibration()
    original.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path / "calibration.json") == original


def test_a_file_that_is_not_a_calibration_is_refused_by_name(tmp_path):
    (tmp_path / "bad.json").write_text('{"description": "half a file"}')
    with pytest.raises(CalibrationError, match="bad.json is not a calibration file"):
        Calibration.load(tmp_path / "bad.json")


def test_decode_steps_interpolate_between_batch_sizes_and_extend_past_the_last():
    cal = calibration()  # 0.05 s at batch 1, 0.11 s at batch 4
    assert cal.decode_step_time(2, 0) == pytest.approx(0.07)
    assert cal.decode_step_time(7, 0) == pytest.approx(0.17)
    assert cal.decode_step_time(1, 1000) == pytest.approx(0.06)


def test_the_checked_in_calibration_is_fitted_from_the_checked_in_runs():
    checked_in = Calibration.load(DEFAULT_CALIBRATION)
    refitted = fit(load_measured_runs(DEFAULT_RESULTS), "benchmarks/results", checked_in.command)
    for name, value in dataclasses.asdict(checked_in).items():  # floats to rounding: BLAS may differ
        assert getattr(refitted, name) == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9)), name
