"""The repository's defaults as served: `dtype: auto` (bf16 on CPUs with AMX-BF16 or AVX512-BF16,
fp32 on others), and the disaggregated path still answers exactly as the aggregated one.

Each prompt is new to both paths, so both prefill it whole: in bf16 a prompt partly served from
the prefix cache may drift from a cold one after some tokens (the products of 16 rows and more run
on AMX tiles, fewer rows on AVX512-BF16, summing in other orders), which is why the session
server (tests/conftest.py) runs fp32."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from client.generate import GenerateRequest, infer_inputs
from launcher import TritonServer
from launcher.cli import MODES
from launcher.ports import free_server_ports
from python_backend_utils.cpu_features import auto_dtype, cpu_flags
from tests.helpers import PROMPTS, generate, stream_results

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def auto_server(tmp_path_factory) -> Iterator[TritonServer]:
    server = TritonServer(**free_server_ports(), models=MODES["both"],
                          log_file=tmp_path_factory.mktemp("dtype-auto") / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_every_engine_logs_the_dtype_auto_chose_and_its_threads(auto_server):
    log = auto_server.log_file.read_text(errors="replace")
    for instance in ("context/1", "generation/1", "aggregated/1"):
        assert f"{instance}: dtype {auto_dtype('cpu', cpu_flags())} (auto: the CPU has" in log, instance
    assert "1 thread(s), unpinned" in log


def test_disaggregated_equals_aggregated_in_the_dtype_auto_chose(auto_server):
    aggregated = {prompt: generate(auto_server, "ensemble_aggregated", prompt) for prompt in PROMPTS}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        disaggregated = list(pool.map(lambda p: generate(auto_server, "ensemble", p), PROMPTS))
    assert disaggregated == [aggregated[p] for p in PROMPTS]


def test_a_stream_in_the_dtype_auto_chose_adds_up_to_the_aggregated_answer(auto_server):
    prompt = "A stream, token by token, of a prompt neither path has seen:"
    request = GenerateRequest(prompt, max_tokens=12, stream=True)
    streamed = stream_results(auto_server.urls.grpc, "ensemble", infer_inputs(request.arrays()))
    text = "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in streamed)
    assert text == generate(auto_server, "ensemble_aggregated", prompt)
