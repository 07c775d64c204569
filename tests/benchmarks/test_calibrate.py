"""benchmarks.calibrate times a real (tiny) engine into a calibration the simulator can load."""

from __future__ import annotations

import pytest

from benchmarks.calibrate import calibrate
from benchmarks.tiny_model import write_tiny_model
from planner.calibration import Calibration
from planner.validate import DEFAULT_CALIBRATION


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_the_engine_terms_are_timed_and_the_server_terms_kept(tiny_dir, tmp_path):
    base = Calibration.load(DEFAULT_CALIBRATION)
    timed = calibrate(base, tiny_dir, "cpu", "float32", 1, "test")
    assert timed.prefill_time(2048) > timed.prefill_time(128) > 0
    assert all(step > 0 for step in timed.decode_base_s)
    assert timed.decode_step_time(16, 16 * 1024) > timed.decode_step_time(1, 128)
    assert timed.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert (timed.request_overhead_s, timed.disaggregated_overhead_s, timed.kv_transfer_bytes_per_s) == (
        base.request_overhead_s, base.disaggregated_overhead_s, base.kv_transfer_bytes_per_s)
    timed.save(tmp_path / "timed.json")
    assert Calibration.load(tmp_path / "timed.json") == timed
