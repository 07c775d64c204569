"""Shared fixtures. `triton_server` starts one real tritonserver for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from launcher import TritonServer
from launcher.cli import MODES
from launcher.ports import free_server_ports
from tests.helpers import PROMPTS, generate


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver on free ports serving both paths: `ensemble` (disaggregated), `ensemble_unary`
    and `ensemble_aggregated`, with every model they reach."""
    log_file = tmp_path_factory.mktemp("tritonserver") / "server.log"
    server = TritonServer(
        **free_server_ports(),
        models=MODES["both"],
        log_file=log_file,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def aggregated_answers(triton_server: TritonServer) -> dict[str, str]:
    """The session server's aggregated answer to each of PROMPTS: what every other path must equal."""
    return {prompt: generate(triton_server, "ensemble_aggregated", prompt) for prompt in PROMPTS}
