"""Shared fixtures. `triton_server` starts one real tritonserver for the whole session."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from launcher import TritonServer
from launcher.cli import MODES
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from tests import pb_utils_stand_in
from tests.helpers import FP32_SETTINGS, PROMPTS, generate, wait_for_idle_kv

# Our models' Triton glue imports the module only the Python-backend stub provides: unit tests get the stand-in.
sys.modules.setdefault("triton_python_backend_utils", pb_utils_stand_in)

KV_RELEASE_TIMEOUT_S = 10  # a third of a KV handle's 30 s TTL: a pinned handle cannot pass by expiring


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver on free ports serving both paths: `ensemble` (disaggregated), `ensemble_unary`
    and `ensemble_aggregated`, with every model they reach. Its engines compute in fp32, whatever
    `dtype: auto` picks here: the tests that use it compare tokens and log-probabilities with fp32
    transformers, and answers across prefix-cache states, which only fp32 keeps bit for bit
    (tests/integration/test_dtype_auto.py serves what auto picks)."""
    work = tmp_path_factory.mktemp("tritonserver")
    repository = work / "model_repository"
    render_repository(DEFAULT_MODEL_REPOSITORY, repository, settings=tuple(map(Setting.parse, FP32_SETTINGS)))
    server = TritonServer(
        **free_server_ports(),
        model_repository=repository,
        models=MODES["both"],
        log_file=work / "server.log",
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


@pytest.fixture(scope="module", autouse=True)
def kv_released_by_each_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module that used the session server leaves no KV behind: checked within seconds of its last
    test, so a leak is blamed on the module that made it, and never hidden by the handles' TTL."""
    if not any("triton_server" in item.fixturenames for item in request.session.items
               if item.getparent(pytest.Module) is request.node):
        yield
        return
    server = request.getfixturevalue("triton_server")
    yield
    used = wait_for_idle_kv(server, timeout_s=KV_RELEASE_TIMEOUT_S)
    assert used and all(v == 0 for v in used.values()), f"KV blocks still in use after this module: {used}"
