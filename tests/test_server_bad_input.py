"""Each kind of bad request gets a clear error, and the server goes on serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client.generate import GenerateError, GenerateRequest, generate_grpc, infer_inputs

pytestmark = pytest.mark.integration


def error_of(url: str, arrays: dict[str, np.ndarray]) -> str:
    """The error a gRPC streaming request with these inputs gets (the test fails if none)."""
    client = grpcclient.InferenceServerClient(url)
    errors = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    try:
        client.async_stream_infer("ensemble", infer_inputs(arrays))
    finally:
        client.stop_stream()  # waits for the answer
        client.close()
    assert errors and errors[0] is not None, "the request should have failed"
    return str(errors[0])


def assert_still_serves(url: str) -> None:
    assert "".join(generate_grpc(url, GenerateRequest("The capital of France is", max_tokens=2))).strip()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text_input": np.array([b""], dtype=np.object_)}, "the prompt is empty"),
        ({"max_tokens": np.array([0], dtype=np.int32)}, "max_tokens must be at least 1, got 0"),
        ({"max_tokens": np.array([-3], dtype=np.int32)}, "max_tokens must be at least 1, got -3"),
        ({"max_tokens": np.array([1_000_000], dtype=np.int32)}, "exceeds the context window"),
        ({"temperature": np.array([-0.5], dtype=np.float32)}, "temperature must be >= 0, got -0.5"),
        ({"top_p": np.array([0.0], dtype=np.float32)}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": np.array([1.5], dtype=np.float32)}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": np.array([-1], dtype=np.int32)}, "top_k must be >= 0"),
        ({"text_input": np.array([b"caf\xe9"], dtype=np.object_)}, "text_input is not valid UTF-8"),
        ({"max_tokens": np.array([8.0], dtype=np.float32)}, "data-type is 'FP32', but model 'ensemble' expects 'INT32'"),
        ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, "unexpected shape for input 'text_input'"),
    ],
    ids=[
        "empty-text",
        "zero-max-tokens",
        "negative-max-tokens",
        "max-tokens-over-limit",
        "negative-temperature",
        "zero-top-p",
        "top-p-over-one",
        "negative-top-k",
        "invalid-utf8",
        "wrong-dtype",
        "wrong-shape",
    ],
)
def test_bad_input_gets_a_clear_error(triton_server, change, message):
    arrays = {**GenerateRequest("The capital of France is", max_tokens=4).arrays(), **change}
    assert message in error_of(triton_server.urls.grpc, arrays)
    assert_still_serves(triton_server.urls.grpc)


def test_prompt_longer_than_the_context_window(triton_server):
    arrays = GenerateRequest(" hello" * 9000, max_tokens=4).arrays()
    error = error_of(triton_server.urls.grpc, arrays)
    assert "the model's context window is" in error and "shorten it" in error
    assert_still_serves(triton_server.urls.grpc)


def test_generate_endpoint_answers_bad_input_with_400(triton_server):
    body = json.dumps({"text_input": "Hi", "max_tokens": 4, "top_p": 0}).encode()
    url = f"http://{triton_server.urls.http}/v2/models/ensemble/generate"
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60)
    assert raised.value.code == 400
    assert "top_p must be in (0, 1]" in json.loads(raised.value.read())["error"]


def test_client_reports_the_error(triton_server):
    with pytest.raises(GenerateError, match="max_tokens must be at least 1"):
        list(generate_grpc(triton_server.urls.grpc, GenerateRequest("Hi", max_tokens=0)))
