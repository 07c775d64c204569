"""A corpus of malformed requests: each gets a clear error naming what is wrong, the server goes
on serving, and at the end no KV block is left behind.

Requests go to `ensemble` (what clients use) and straight to the models behind it (`context`,
`generation`, `aggregated`, `disaggregated_serving_bls`), which anyone who reaches the server can
call too. Forged and tampered `context_phase_params` are refused before the generation instance
contacts anything (the params are authenticated under the deployment key, see python_backend_utils/serving/context_params.py).
"""

from __future__ import annotations

import json
import os
import queue
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.generate import GenerateError, GenerateRequest, generate_grpc, infer_inputs
from kv_transfer import KVHandle, KVLayout
from kv_transfer.layout import SharedPool
from kv_transfer.liveness import ProcessIdentity
from launcher.server import ADMIN_HEADER
from python_backend_utils.serving.context_params import ContextPhaseParams
from python_backend_utils.triton_glue.input_limits import (
    MAX_PROMPT_IDS,
    MAX_WORD_LIST_BYTES,
    MAX_WORD_LIST_IDS,
    MAX_WORDS,
)
from tests.helpers import metric_values, wait_for_idle_kv

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
TOKENS = list(range(1000, 1020))  # in-vocabulary ids, for requests straight to the engine models
HUGE_ID = 100_000_000


def stream(url: str, model: str, arrays: dict[str, np.ndarray], *, request_id: str = "",
           timeout_s: float = 120.0) -> tuple[list[grpcclient.InferResult], str | None]:
    """Every response of one gRPC streaming request, and its error (None if it ended cleanly)."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    results = []
    try:
        client.async_stream_infer(model, infer_inputs(arrays), request_id=request_id,
                                  enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                return results, str(error)
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()
        client.close()


def error_of(url: str, model: str, arrays: dict[str, np.ndarray]) -> str:
    results, error = stream(url, model, arrays)
    assert error is not None, f"the request to {model} should have failed"
    return error


def assert_still_serves(url: str) -> None:
    assert "".join(generate_grpc(url, GenerateRequest(PROMPT, max_tokens=2))).strip()


def ensemble_inputs(**change) -> dict[str, np.ndarray]:
    """A good ensemble request with `change` applied (None removes an input), each changed value
    given the batch dimension of one that every ensemble input has."""
    batched = {name: None if value is None else value[np.newaxis] for name, value in change.items()}
    arrays = {**GenerateRequest(PROMPT, max_tokens=4).arrays(), **batched}
    return {name: value for name, value in arrays.items() if value is not None}


def worker_inputs(**change) -> dict[str, np.ndarray]:
    """A good request in the engine models' (TensorRT-LLM tensorrt_llm) names, with `change` applied."""
    arrays = {"input_ids": np.array(TOKENS, dtype=np.int32), "request_output_len": np.array([4], dtype=np.int32),
              **change}
    return {name: value for name, value in arrays.items() if value is not None}


def i32(*values) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def text(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=np.object_)


ENSEMBLE_CASES = {
    # the prompt
    "empty-text": ({"text_input": text(b"")}, "the prompt is empty"),
    "invalid-utf8-text": ({"text_input": text(b"caf\xe9")}, "text_input is not valid UTF-8"),
    # max_tokens
    "zero-max-tokens": ({"max_tokens": i32(0)}, "max_tokens must be at least 1, got 0"),
    "negative-max-tokens": ({"max_tokens": i32(-3)}, "max_tokens must be at least 1, got -3"),
    "max-tokens-over-window": ({"max_tokens": i32(1_000_000)}, "exceeds the context window"),
    "max-tokens-int32-max": ({"max_tokens": i32(2**31 - 1)}, "max_tokens (2147483647) exceeds the context window"),
    # sampling values
    "negative-temperature": ({"temperature": f32(-0.5)}, "temperature must be a finite number >= 0, got -0.5"),
    "nan-temperature": ({"temperature": f32(np.nan)}, "temperature must be a finite number >= 0, got nan"),
    "infinite-temperature": ({"temperature": f32(np.inf)}, "temperature must be a finite number >= 0, got inf"),
    "zero-top-p": ({"top_p": f32(0.0)}, "top_p must be in (0, 1], got 0.0"),
    "top-p-over-one": ({"top_p": f32(1.5)}, "top_p must be in (0, 1], got 1.5"),
    "nan-top-p": ({"top_p": f32(np.nan)}, "top_p must be in (0, 1], got nan"),
    "negative-top-k": ({"top_k": i32(-1)}, "top_k must be >= 0 (0 disables it), got -1"),
    "end-id-outside-vocab": ({"end_id": i32(HUGE_ID)}, f"end_id {HUGE_ID} is outside the vocabulary [0, "),
    "negative-end-id": ({"end_id": i32(-1)}, "end_id -1 is outside the vocabulary [0, "),
    "pad-id-outside-vocab": ({"pad_id": i32(HUGE_ID)}, f"pad_id {HUGE_ID} is outside the vocabulary [0, "),
    # stop and bad words
    "invalid-utf8-stop-word": ({"stop_words": text(b"ok", b"\xff\xfe")}, "stop_words is not valid UTF-8"),
    "invalid-utf8-bad-word": ({"bad_words": text(b"\xc3")}, "bad_words is not valid UTF-8"),
    "empty-stop-word": ({"stop_words": text(b"")}, "stop_words holds an empty word"),
    "empty-bad-word": ({"bad_words": text(b"fine", b"")}, "bad_words holds an empty word"),
    "too-many-stop-words": ({"stop_words": text(*[b"w"] * (MAX_WORDS + 1))}, f"stop_words holds {MAX_WORDS + 1} words"),
    "bad-words-too-long": ({"bad_words": text(b"x" * (MAX_WORD_LIST_BYTES + 1))},
                           f"bad_words holds {MAX_WORD_LIST_BYTES + 1} bytes, more than the"),
    # sizes
    "text-longer-than-the-window-holds": ({"text_input": text(b"a" * 1_000_000)},
                                          "text_input has 1000000 bytes, more than fit in the model's context window"),
    "missing-text-input": ({"text_input": None}, "text_input is required"),
    # types, shapes, names: Triton's own checks
    "wrong-dtype-max-tokens": ({"max_tokens": f32(8.0)}, "data-type is 'FP32', but model 'ensemble' expects 'INT32'"),
    "wrong-dtype-text": ({"text_input": i32(5)}, "input 'text_input' data-type is 'INT32', but model 'ensemble' expects 'BYTES'"),
    "wrong-dtype-temperature": ({"temperature": np.array([0.5])}, "'temperature' data-type is 'FP64', but model 'ensemble' expects 'FP32'"),
    "wrong-dtype-seed": ({"random_seed": np.array([-1], dtype=np.int64)}, "'random_seed' data-type is 'INT64', but model 'ensemble' expects 'UINT64'"),
    "wrong-dtype-stream": ({"stream": i32(1)}, "'stream' data-type is 'INT32', but model 'ensemble' expects 'BOOL'"),
    "wrong-shape-text": ({"text_input": text(b"a", b"b")}, "unexpected shape for input 'text_input'"),
    "wrong-rank-text": ({"text_input": np.array([[b"a"]], dtype=np.object_)}, "unexpected shape for input 'text_input' for model 'ensemble'. Expected [-1,1], got [1,1,1]"),
    "wrong-shape-max-tokens": ({"max_tokens": i32(4, 4)}, "unexpected shape for input 'max_tokens'"),
    "unknown-input-beam-width": ({"beam_width": i32(2)}, "unexpected inference input 'beam_width' for model 'ensemble'"),
    "params-sent-to-ensemble": ({"context_phase_params": np.zeros(64, np.uint8)}, "unexpected inference input 'context_phase_params'"),
}


@pytest.mark.parametrize(("change", "message"), ENSEMBLE_CASES.values(), ids=ENSEMBLE_CASES.keys())
def test_bad_ensemble_request_gets_a_clear_error(triton_server, change, message):
    assert message in error_of(triton_server.urls.grpc, "ensemble", ensemble_inputs(**change))
    assert_still_serves(triton_server.urls.grpc)


def test_an_unbatched_request_is_refused_with_the_shape_expected(triton_server):
    """[1] inputs: Triton checks a batching model's shapes itself, so no model can take both ranks."""
    unbatched = {name: array.reshape(-1) for name, array in GenerateRequest(PROMPT, max_tokens=4).arrays().items()}
    message = error_of(triton_server.urls.grpc, "ensemble", unbatched)
    assert "Expected [-1,1], got [1]" in message
    assert_still_serves(triton_server.urls.grpc)


def foreign_params(prompt: list[int]) -> np.ndarray:
    """Well-formed params whose handle names pid 1, fd 0 and a made-up UCX address, signed with a key
    that is not the deployment's: what an outsider who knows the format can build."""
    layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
    here = ProcessIdentity.current()
    handle = KVHandle(agent_name="context/1@1", agent_address=os.urandom(200),
                      agent_process=ProcessIdentity(here.boot_id, here.pid_namespace, 1, 0), request_id="any",
                      block_ids=(0, 1), num_tokens=len(prompt), layout=layout, secret=bytes(16),
                      expires_at=time.time() + 60, max_message_bytes=1 << 20,
                      shared_pool=SharedPool(fd=0, offset=0, nbytes=1 << 30))
    params = ContextPhaseParams("context/1", 42, len(prompt), handle.to_bytes())
    return np.frombuffer(params.to_bytes(os.urandom(32), prompt), dtype=np.uint8)


WORKER_CASES = {
    "aggregated-token-outside-vocab": ("aggregated", {"input_ids": i32(1, 2, HUGE_ID)},
                                       f"input_ids holds token id {HUGE_ID}, outside the vocabulary [0, "),
    "context-negative-token": ("context", {"input_ids": i32(5, -7)}, "input_ids holds token id -7, outside the vocabulary"),
    "generation-empty-prompt": ("generation", {"input_ids": np.zeros(0, np.int32)}, "the prompt is empty"),
    "generation-missing-input-ids": ("generation", {"input_ids": None, "end_id": i32(2)}, "input_ids is required"),
    "context-input-lengths-too-long": ("context", {"input_lengths": i32(99)}, "input_lengths is 99 but input_ids holds 20 tokens"),
    "aggregated-negative-input-lengths": ("aggregated", {"input_lengths": i32(-1)}, "input_lengths is -1"),
    "context-prompt-over-window": ("context", {"input_ids": np.full(20_000, 1000, np.int32)}, "the model's context window is"),
    "generation-prompt-over-id-limit": ("generation", {"input_ids": np.full(MAX_PROMPT_IDS + 1, 1000, np.int32)},
                                        f"input_ids holds {MAX_PROMPT_IDS + 1} token ids, more than the"),
    "bls-word-list-over-id-limit": ("disaggregated_serving_bls",
                                    {"bad_words_list": np.full((2, MAX_WORD_LIST_IDS + 1), -1, np.int32)},
                                    f"bad_words_list holds {MAX_WORD_LIST_IDS + 1} ids, more than the"),
    "aggregated-stop-words-offset-outside": ("aggregated", {"stop_words_list": i32(1, 2, 5, -1).reshape(2, 2)},
                                             "stop_words_list has an offset 5 outside its 2 ids"),
    "aggregated-bad-word-outside-vocab": ("aggregated", {"bad_words_list": i32(HUGE_ID, 1).reshape(2, 1)},
                                          f"bad_words holds token id {HUGE_ID}, outside the vocabulary"),
    "context-word-list-rank": ("context", {"stop_words_list": i32(1, 2, 3)}, "unexpected shape for input 'stop_words_list'"),
    "generation-wrong-dtype-ids": ("generation", {"input_ids": f32(1, 2)}, "'input_ids' data-type is 'FP32', but model 'generation' expects 'INT32'"),
    "params-sent-to-context": ("context", {"context_phase_params": np.zeros(64, np.uint8)},
                               "unexpected inference input 'context_phase_params' for model 'context'"),
    "params-sent-to-aggregated": ("aggregated", {"context_phase_params": np.zeros(64, np.uint8)},
                                  "unexpected inference input 'context_phase_params' for model 'aggregated'"),
    "generation-empty-params": ("generation", {"context_phase_params": np.zeros(0, np.uint8)},
                                "context_phase_params has 0 bytes, fewer than its header and authentication tag"),
    "generation-garbage-params": ("generation", {"context_phase_params": np.arange(200, dtype=np.uint8)},
                                  "context_phase_params was not produced by a context model of this version"),
    "generation-params-wrong-dtype": ("generation", {"context_phase_params": i32(1, 2, 3)},
                                      "'context_phase_params' data-type is 'INT32', but model 'generation' expects 'UINT8'"),
    "generation-stop-wrong-dtype": ("generation", {"stop": i32(1)}, "'stop' data-type is 'INT32', but model 'generation' expects 'BOOL'"),
    "generation-stop-wrong-shape": ("generation", {"stop": np.array([True, True])}, "unexpected shape for input 'stop'"),
    "bls-token-outside-vocab": ("disaggregated_serving_bls", {"input_ids": i32(1, HUGE_ID)},
                                f"input_ids holds token id {HUGE_ID}, outside the vocabulary"),
    "bls-zero-output-len": ("disaggregated_serving_bls", {"request_output_len": i32(0)}, "max_tokens must be at least 1, got 0"),
    "bls-top-p-over-one": ("disaggregated_serving_bls", {"runtime_top_p": f32(2.0)}, "top_p must be in (0, 1], got 2.0"),
    "bls-wrong-dtype-ids": ("disaggregated_serving_bls", {"input_ids": np.array([1], dtype=np.int64)},
                            "data-type is 'INT64', but model 'disaggregated_serving_bls' expects 'INT32'"),
}


@pytest.mark.parametrize(("model", "change", "message"), WORKER_CASES.values(), ids=WORKER_CASES.keys())
def test_bad_request_straight_to_a_model_gets_a_clear_error(triton_server, model, change, message):
    assert message in error_of(triton_server.urls.grpc, model, worker_inputs(**change))
    assert_still_serves(triton_server.urls.grpc)


def total(server, metric: str, model: str) -> float:
    return sum(v for labels, v in metric_values(server, metric).items() if f'model="{model}"' in labels)


def wait_for_metric(server, metric: str, model: str, at_least: float, timeout_s: float = 10.0) -> float:
    """Metrics are published on the engine loop's tick: wait for the value to get there."""
    deadline = time.monotonic() + timeout_s
    while (value := total(server, metric, model)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def settled_pulls(server) -> float:
    """Pulls the generation instances finished, once the published value stops moving (it lags a tick)."""
    def read() -> float:
        return total(server, "disagg_kv_pulls_failed_total", "generation") + \
            total(server, "disagg_kv_pulls_completed_total", "generation")

    previous = read()
    while True:
        time.sleep(0.6)  # a little over two engine ticks
        if (current := read()) == previous:
            return current
        previous = current


def test_forged_params_are_refused_before_anything_is_contacted(triton_server):
    pulls = settled_pulls(triton_server)
    rejected = total(triton_server, "disagg_context_params_rejected_total", "generation")
    error = error_of(triton_server.urls.grpc, "generation",
                     worker_inputs(context_phase_params=foreign_params(TOKENS)))
    assert "context_phase_params failed authentication" in error
    assert wait_for_metric(triton_server, "disagg_context_params_rejected_total", "generation", rejected + 1) >= rejected + 1
    assert settled_pulls(triton_server) == pulls  # no pull was started
    assert_still_serves(triton_server.urls.grpc)


def genuine_params(url: str, prompt: list[int]) -> np.ndarray:
    """context_phase_params from a context instance (its KV stays pinned until pulled)."""
    results, error = stream(url, "context", worker_inputs(input_ids=np.array(prompt, dtype=np.int32)))
    assert error is None, error
    [params] = [r.as_numpy("context_phase_params") for r in results if r.as_numpy("context_phase_params") is not None]
    return params


def generate_with(url: str, prompt: list[int], params: np.ndarray) -> tuple[list[int], str | None]:
    results, error = stream(url, "generation", worker_inputs(input_ids=np.array(prompt, dtype=np.int32),
                                                             context_phase_params=params,
                                                             exclude_input_in_output=np.array([True])))
    tokens = [t for r in results if r.as_numpy("output_ids") is not None for t in r.as_numpy("output_ids").tolist()]
    return tokens, error


def flip_byte(params: np.ndarray, at: int) -> np.ndarray:
    altered = params.copy()
    altered[at] ^= 0x01
    return altered


TAMPERING = {
    "truncated": (lambda params, prompt: (params[:-5], prompt), "its header declares"),
    "handle-byte-altered": (lambda params, prompt: (flip_byte(params, len(params) // 2), prompt), "failed authentication"),
    "first-token-altered": (lambda params, prompt: (flip_byte(params, 4), prompt), "failed authentication"),
    "tag-altered": (lambda params, prompt: (flip_byte(params, len(params) - 1), prompt), "failed authentication"),
    "other-prompt": (lambda params, prompt: (params, [t + 1 for t in prompt]), "failed authentication"),
    "shorter-prompt": (lambda params, prompt: (params, prompt[:-1]), "failed authentication"),
}


@pytest.mark.parametrize(("tamper", "message"), TAMPERING.values(), ids=TAMPERING.keys())
def test_tampered_params_are_refused_and_the_genuine_ones_still_work(triton_server, tamper, message):
    url = triton_server.urls.grpc
    params = genuine_params(url, TOKENS)
    bad_params, prompt = tamper(params, TOKENS)
    tokens, error = generate_with(url, prompt, bad_params)
    assert error is not None and message in error
    tokens, error = generate_with(url, TOKENS, params)  # the rightful request is untouched; this frees the KV
    assert error is None and len(tokens) == 3  # the first token came from the context instance


def test_replayed_params_are_refused_by_the_context_instance_and_recomputed(triton_server):
    url = triton_server.urls.grpc
    refused = total(triton_server, "disagg_kv_pulls_refused_total", "context")
    fallbacks = total(triton_server, "disagg_kv_pull_fallbacks_total", "generation")
    prompt = [t + 7 for t in TOKENS]
    params = genuine_params(url, prompt)
    first, error = generate_with(url, prompt, params)
    assert error is None
    replayed, error = generate_with(url, prompt, params)  # authentic, but its one pull is spent
    assert error is None and replayed == first  # the generation instance prefilled it itself
    assert wait_for_metric(triton_server, "disagg_kv_pulls_refused_total", "context", refused + 1) >= refused + 1
    assert wait_for_metric(triton_server, "disagg_kv_pull_fallbacks_total", "generation", fallbacks + 1) >= fallbacks + 1


def test_stop_for_no_request_is_a_no_op(triton_server):
    results, error = stream(triton_server.urls.grpc, "generation",
                            {"input_ids": i32(0), "stop": np.array([True])}, request_id="nobody-runs-this")
    assert error is None and all(not r.get_response().outputs for r in results)
    assert_still_serves(triton_server.urls.grpc)


@pytest.mark.parametrize(("call", "message"), [
    (lambda client: client.infer("ensemble", infer_inputs(ensemble_inputs())),
     "ModelInfer RPC doesn't support models with decoupled transaction policy"),
    (lambda client: client.infer("no_such_model", infer_inputs(ensemble_inputs())),
     "Request for unknown model: 'no_such_model' is not found"),
    (lambda client: client.infer("generation", infer_inputs(worker_inputs()), model_version="7"),
     "Request for unknown model: 'generation' version 7 is not found"),
    (lambda client: client.infer("ensemble_unary", infer_inputs(ensemble_inputs()),
                                 outputs=[grpcclient.InferRequestedOutput("logits")]),
     "unexpected inference output 'logits' for model 'ensemble_unary'"),
    (lambda client: client.infer("ensemble_unary", []), "but missing required input(s) ['text_input']"),
], ids=["unary-call-to-decoupled", "unknown-model", "unknown-version", "unknown-output", "no-inputs"])
def test_unknown_request_kinds_get_a_clear_error(triton_server, call, message):
    client = grpcclient.InferenceServerClient(triton_server.urls.grpc)
    try:
        with pytest.raises(InferenceServerException) as raised:
            call(client)
        assert message in str(raised.value)
    finally:
        client.close()
    assert_still_serves(triton_server.urls.grpc)


def test_prompt_longer_than_the_context_window(triton_server):
    arrays = GenerateRequest(" hello" * 9000, max_tokens=4).arrays()
    error = error_of(triton_server.urls.grpc, "ensemble", arrays)
    assert "the model's context window is" in error and "shorten it" in error
    assert_still_serves(triton_server.urls.grpc)


def test_generate_endpoint_answers_bad_input_with_400(triton_server):
    body = json.dumps({"text_input": "Hi", "max_tokens": 4, "top_p": 0}).encode()
    url = f"http://{triton_server.urls.http}/v2/models/ensemble/generate"
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60)
    assert raised.value.code == 400
    assert "top_p must be in (0, 1]" in json.loads(raised.value.read())["error"]


def post_generate(server, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{server.urls.http}/v2/models/ensemble/generate", data=body,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_generate_without_text_input_is_a_400(triton_server):
    status, answer = post_generate(triton_server, json.dumps({"max_tokens": 4}).encode())
    assert (status, answer["error"]) == (400, "in ensemble 'ensemble', text_input is required: send the prompt as text")


def test_an_8_mb_form_encoded_body_is_refused_and_the_server_goes_on(triton_server):
    """curl -d sends application/x-www-form-urlencoded, which Triton 2.51's HTTP library parses on
    its thread's stack: this body crashed the whole server before the launcher raised the stack size."""
    body = json.dumps({"text_input": "a" * 8_400_000, "max_tokens": 4}).encode()
    status, answer = post_generate(triton_server, body, "application/x-www-form-urlencoded")
    assert status == 400 and "text_input has 8400000 bytes, more than fit" in answer["error"]
    assert_still_serves(triton_server.urls.grpc)


def test_the_model_repository_api_refuses_clients_without_the_key(triton_server):
    for path in ("models/ensemble/unload", "models/ensemble/load", "index"):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(urllib.request.Request(f"http://{triton_server.urls.http}/v2/repository/{path}",
                                                          data=b"{}"), timeout=30)
        assert raised.value.code == 403, path
    index = urllib.request.Request(f"http://{triton_server.urls.http}/v2/repository/index", data=b"{}",
                                   headers={ADMIN_HEADER: triton_server.admin_key})
    with urllib.request.urlopen(index, timeout=30) as response:  # the launcher's key opens it
        assert {"name": "ensemble", "version": "1", "state": "READY"} in json.loads(response.read())
    client = grpcclient.InferenceServerClient(triton_server.urls.grpc)
    try:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            client.unload_model("ensemble")
        assert client.is_model_ready("ensemble")
    finally:
        client.close()
    assert_still_serves(triton_server.urls.grpc)


def test_client_reports_the_error(triton_server):
    with pytest.raises(GenerateError, match="max_tokens must be at least 1"):
        list(generate_grpc(triton_server.urls.grpc, GenerateRequest("Hi", max_tokens=0)))


def test_the_corpus_left_no_kv_blocks_behind(triton_server):
    """Runs last in this module: every refused, tampered, replayed and stopped request above let go of its KV."""
    used = wait_for_idle_kv(triton_server, timeout_s=15)
    assert used and all(v == 0 for v in used.values()), used
