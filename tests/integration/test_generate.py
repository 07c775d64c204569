"""The ensemble on a real tritonserver, through every public protocol a client may use."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from client.generate import GenerateRequest, generate_grpc, generate_http, infer_inputs
from python_backend_utils.triton_glue.tokenizer import load_tokenizer
from tests.helpers import post_json, stream_results

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
# Greedy SmolLM2-135M-Instruct does not reach its end token within these many tokens of PROMPT.
MAX_TOKENS = 16


def test_greedy_answer_names_paris(triton_server):
    text = "".join(generate_grpc(triton_server.urls.grpc, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS)))
    assert "Paris" in text


def test_http_infer(triton_server):
    client = httpclient.InferenceServerClient(triton_server.urls.http)
    arrays = GenerateRequest(PROMPT, max_tokens=MAX_TOKENS, exclude_input_in_output=False).arrays()
    result = client.infer("ensemble_unary", infer_inputs(arrays, protocol=httpclient))
    assert result.as_numpy("text_output").shape == (1, 1)
    text = result.as_numpy("text_output")[0, 0].decode()
    assert text.startswith(PROMPT) and "Paris" in text


def test_grpc_infer(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.urls.grpc)
    result = client.infer("ensemble_unary", infer_inputs(GenerateRequest(PROMPT, max_tokens=MAX_TOKENS).arrays()))
    assert "Paris" in result.as_numpy("text_output")[0, 0].decode()


def test_unary_model_refuses_to_stream(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.urls.grpc)
    with pytest.raises(Exception, match="sends one response"):
        client.infer("ensemble_unary", infer_inputs(GenerateRequest(PROMPT, stream=True).arrays()))


def test_grpc_streaming_sends_one_response_per_token_and_the_same_text(triton_server):
    url = triton_server.urls.grpc
    streamed = GenerateRequest(PROMPT, max_tokens=MAX_TOKENS, stream=True)
    results = stream_results(url, "ensemble", infer_inputs({**streamed.arrays(), "return_log_probs": np.array([[True]])}))
    assert len(results) == MAX_TOKENS
    assert all(r.as_numpy("output_log_probs").shape == (1, 1, 1) for r in results)
    streamed_text = "".join(r.as_numpy("text_output")[0, 0].decode() for r in results)

    whole = GenerateRequest(PROMPT, max_tokens=MAX_TOKENS)
    [result] = stream_results(url, "ensemble", infer_inputs({**whole.arrays(), "return_log_probs": np.array([[True]])}))
    assert result.as_numpy("text_output")[0, 0].decode() == streamed_text
    log_probs = np.concatenate([r.as_numpy("output_log_probs").reshape(-1) for r in results])
    np.testing.assert_allclose(result.as_numpy("output_log_probs"), [[log_probs]], rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("cum_log_probs"), [[log_probs.sum()]], rtol=1e-5)
    assert (log_probs <= 0).all()


def tensorrt_llm_inputs(protocol, prompt: str, max_tokens: int, stream: bool) -> list:
    """A request as TensorRT-LLM's own clients build it: every input [1, 1] (batch, value)."""
    arrays = {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
              "max_tokens": np.array([[max_tokens]], dtype=np.int32), "stream": np.array([[stream]]),
              "exclude_input_in_output": np.array([[True]]), "return_log_probs": np.array([[True]])}
    inputs = []
    for name, array in arrays.items():
        tensor = protocol.InferInput(name, [1, 1], {np.object_: "BYTES", np.int32: "INT32", np.bool_: "BOOL"}[
            array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("model", ["ensemble", "ensemble_aggregated"])
def test_a_tensorrt_llm_batched_request_streams_the_text_of_the_generate_endpoint(triton_server, model):
    """TensorRT-LLM's [1, 1] inputs over gRPC streaming give its output shapes ([batch, beam] text,
    [batch, beam, tokens] log-probs) and the same text as the generate endpoints (no shapes: HTTP)."""
    results = stream_results(triton_server.urls.grpc, model, tensorrt_llm_inputs(grpcclient, PROMPT, MAX_TOKENS, True))
    assert len(results) == MAX_TOKENS
    assert all(r.as_numpy("text_output").shape == (1, 1) and r.as_numpy("output_log_probs").shape == (1, 1, 1)
               and r.as_numpy("cum_log_probs").shape == (1, 1) for r in results)
    streamed = "".join(r.as_numpy("text_output")[0, 0].decode() for r in results)
    http_stream = generate_http(triton_server.urls.http, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS, stream=True),
                                model=model)
    assert "".join(http_stream) == streamed
    answer = json.loads(post_json(f"http://{triton_server.urls.http}/v2/models/{model}/generate",
                                  {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "exclude_input_in_output": True}))
    assert answer["text_output"] == streamed


def test_a_tensorrt_llm_batched_unary_request_over_http_gets_the_same_text(triton_server):
    client = httpclient.InferenceServerClient(triton_server.urls.http)
    result = client.infer("ensemble_unary", tensorrt_llm_inputs(httpclient, PROMPT, MAX_TOKENS, False))
    streamed = stream_results(triton_server.urls.grpc, "ensemble",
                              tensorrt_llm_inputs(grpcclient, PROMPT, MAX_TOKENS, True))
    assert result.as_numpy("text_output").shape == (1, 1) and result.as_numpy("output_log_probs").shape == (1, 1, 16)
    assert result.as_numpy("text_output")[0, 0].decode() == "".join(
        r.as_numpy("text_output")[0, 0].decode() for r in streamed)


def test_perf_analyzer_drives_the_batched_ensemble_with_the_shipped_inputs(triton_server, tmp_path):
    """perf_analyzer adds the batch dimension itself, so client/data/perf_inputs.json (one value per
    input, no shapes) still drives `ensemble`: its first prompt, with fewer tokens out to be quick."""
    shipped = json.loads((Path(__file__).resolve().parents[2] / "client" / "data" / "perf_inputs.json").read_text())
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"data": [{**shipped["data"][0], "max_tokens": [4]}]}))
    run = subprocess.run(
        [sys.executable, "-m", "launcher.perf_analyzer", "-m", "ensemble", "-u", triton_server.urls.grpc, "-i", "grpc",
         "--streaming", "--input-data", str(inputs), "--concurrency-range", "1:1", "--measurement-mode",
         "count_windows", "--measurement-request-count", "2", "--stability-percentage", "999", "--max-trials", "3"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Throughput" in run.stdout


def test_generate_endpoint(triton_server):
    url = f"http://{triton_server.urls.http}/v2/models/ensemble/generate"
    answer = json.loads(post_json(url, {"text_input": PROMPT, "max_tokens": MAX_TOKENS}))
    assert answer["text_output"].startswith(PROMPT + " Paris")


def test_generate_stream_endpoint_matches_generate(triton_server):
    url = triton_server.urls.http
    pieces = list(generate_http(url, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS, stream=True)))
    assert len(pieces) == MAX_TOKENS
    whole = list(generate_http(url, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS)))
    assert whole == ["".join(pieces)]


def test_stop_words_end_the_answer(triton_server):
    request = GenerateRequest(PROMPT, max_tokens=MAX_TOKENS, stop_words=[" Paris"])
    assert "".join(generate_grpc(triton_server.urls.grpc, request)) == " Paris"


def test_cancelled_stream_leaves_the_server_serving(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.urls.grpc)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    request = GenerateRequest("Once upon a time", max_tokens=48, stream=True)
    client.async_stream_infer("ensemble", infer_inputs(request.arrays()))
    for _ in range(3):
        result, error = responses.get(timeout=120)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert "Paris" in "".join(generate_grpc(triton_server.urls.grpc, GenerateRequest(PROMPT, max_tokens=8)))


def aggregated_stub_cpu_seconds(server_pid: int) -> float:
    """CPU time used so far by the `aggregated` model's stub process (a child of tritonserver)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == server_pid and b"/aggregated/1/model.py" in cmdline:
            return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    raise AssertionError("no stub process for the aggregated model")


def engine_cpu_share(server_pid: int, seconds: float = 2.0) -> float:
    start = aggregated_stub_cpu_seconds(server_pid)
    time.sleep(seconds)
    return (aggregated_stub_cpu_seconds(server_pid) - start) / seconds


def test_cancelling_a_stream_on_the_middle_step_stops_its_generation(triton_server):
    """A cancelled request is aborted at once: the engine goes idle instead of decoding on.

    Called on `aggregated` directly: Triton 2.51 does not pass an ensemble request's
    cancellation on to a composing request that is already running.
    """
    deadline = time.monotonic() + 60
    while engine_cpu_share(triton_server.pid, 1.0) > 0.2:  # earlier tests' requests may still be decoding
        assert time.monotonic() < deadline, "the engine never went idle"
    prompt_ids = load_tokenizer({}).encode("Once upon a time")
    arrays = {
        "input_ids": np.array(prompt_ids, dtype=np.int32),
        "request_output_len": np.array([2000], dtype=np.int32),
        "streaming": np.array([True]),
    }
    client = grpcclient.InferenceServerClient(triton_server.urls.grpc)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("aggregated", infer_inputs(arrays))
    for _ in range(3):
        result, error = responses.get(timeout=120)
        assert error is None
    assert engine_cpu_share(triton_server.pid, 1.0) > 0.5, "the engine should be decoding"
    client.stop_stream(cancel_requests=True)
    client.close()
    time.sleep(0.5)
    assert engine_cpu_share(triton_server.pid) < 0.2
