"""A stop is clean: SIGTERM (what Ctrl-C sends through the launcher) unloads every model and
ends every stub without a crash, after UCX endpoints and engines have been used."""

from __future__ import annotations

import pytest

from launcher import TritonServer
from launcher.cli import MODES
from launcher.ports import free_server_ports
from launcher.server import DEFAULT_MODEL_REPOSITORY
from tests.helpers import crash_lines, generate

pytestmark = pytest.mark.integration

@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_sigterm_after_serving_stops_without_a_crash(tmp_path, mode):
    log = tmp_path / "server.log"
    server = TritonServer(DEFAULT_MODEL_REPOSITORY, **free_server_ports(), models=MODES[mode], log_file=log)
    try:
        server.start()
        model = "ensemble" if mode == "disaggregated" else "ensemble_aggregated"
        assert generate(server, model, "The capital of France is", max_tokens=4)
    finally:
        server.stop()
    assert server.exit_status == 0, log.read_text()[-3000:]
    crashes = crash_lines(log.read_text())
    assert crashes == [], "\n".join(crashes)
