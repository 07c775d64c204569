"""The orchestrator's admission limit on a real tritonserver: past `max_requests_in_flight` a request
is refused at once with UNAVAILABLE and a message naming the setting, the admitted ones
answer correctly, and once the burst is over the server serves as before.

A server of its own, with a limit of 2, so that the refusals cannot disturb other tests.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.generate import GenerateRequest, infer_inputs
from launcher import TritonServer
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from python_backend_utils.orchestration.remote import STREAM_HEADERS as GRPC_ERROR_HEADER
from tests.helpers import PROMPTS, metric_values, wait_for_idle_kv

pytestmark = pytest.mark.integration

LIMIT = 2
BURST = 8
MAX_TOKENS = 16  # a few seconds of decoding on this machine: the admitted requests are still running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("admission")
    repository = work / "model_repository"
    render_repository(DEFAULT_MODEL_REPOSITORY, repository,
                      settings=(Setting.parse(f"disaggregated_serving_bls.max_requests_in_flight={LIMIT}"),))
    triton = TritonServer(repository, **free_server_ports(),
                          models=["ensemble", "ensemble_unary", "context", "generation"], log_file=work / "server.log")
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


def timed_stream(server, prompt: str) -> tuple[str, str, float]:
    """One gRPC streaming request with Triton's `triton_grpc_error` header, so that an error ends the
    stream with its status code: ("OK", the text, seconds) or (the status, its message, seconds)."""
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=GRPC_ERROR_HEADER)
    arrays = GenerateRequest(prompt, max_tokens=MAX_TOKENS, stream=True).arrays()
    started, text = time.monotonic(), ""
    try:
        client.async_stream_infer("ensemble", infer_inputs(arrays), enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                return error.status(), error.message(), time.monotonic() - started
            output = result.as_numpy("text_output")
            if output is not None:
                text += b"".join(output.reshape(-1)).decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return "OK", text, time.monotonic() - started
    finally:
        client.stop_stream()
        client.close()


def rejected_total(server) -> float:
    return sum(metric_values(server, "disagg_orchestrator_rejected_total").values())


def test_requests_past_the_limit_get_unavailable_at_once_and_the_server_goes_on(server):
    warm = timed_stream(server, PROMPTS[1])
    assert warm[0] == "OK", warm
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(lambda i: timed_stream(server, f"Request {i}. {PROMPTS[1]}"), range(BURST)))

    served = [r for r in results if r[0] == "OK"]
    refused = [r for r in results if r[0] != "OK"]
    assert len(served) >= LIMIT, results  # the limit's worth of requests is always admitted
    assert refused, results
    slowest_answer = max(seconds for _, _, seconds in served)
    for status, message, seconds in refused:
        assert status == "StatusCode.UNAVAILABLE", (status, message)  # retry later, not the client's fault
        assert "max_requests_in_flight" in message and "retry later" in message, message
        assert seconds < min(2.0, slowest_answer), (seconds, slowest_answer)  # refused at once, not queued
    assert all(text.strip() for _, text, _ in served)

    # Every place was given back: a normal request is served, and the refusals were counted.
    after = timed_stream(server, PROMPTS[1])
    assert after[:2] == warm[:2], (after, warm)
    assert rejected_total(server) == len(refused)
    in_flight = metric_values(server, "disagg_orchestrator_requests_in_flight")
    assert in_flight and all(value == 0 for value in in_flight.values()), in_flight
    used = wait_for_idle_kv(server)
    assert used and all(value == 0 for value in used.values()), used


def timed_unary(server, prompt: str) -> tuple[str, str, float]:
    """One plain gRPC infer of ensemble_unary (the ensemble reached through BLS)."""
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    arrays = GenerateRequest(prompt, max_tokens=MAX_TOKENS).arrays()
    started = time.monotonic()
    try:
        result = client.infer("ensemble_unary", infer_inputs(arrays), client_timeout=120)
        return "OK", b"".join(result.as_numpy("text_output").reshape(-1)).decode(), time.monotonic() - started
    except InferenceServerException as error:
        return error.status(), error.message(), time.monotonic() - started
    finally:
        client.close()


def test_a_unary_client_refused_at_the_limit_also_gets_unavailable(server):
    """BLS hands ensemble_unary every error as INTERNAL (server#7804): it restores the code."""
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(lambda i: timed_unary(server, f"Request {i}. {PROMPTS[1]}"), range(BURST)))
    refused = [r for r in results if r[0] != "OK"]
    assert refused and len(refused) <= BURST - LIMIT, results
    assert all(status == "StatusCode.UNAVAILABLE" and "max_requests_in_flight" in message
               for status, message, _ in refused), refused
    assert timed_unary(server, PROMPTS[1])[0] == "OK"
