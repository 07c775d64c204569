"""The OpenAI-compatible frontend on a real tritonserver, through the official `openai` client."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from launcher.openai_process import OpenAIFrontend
from launcher.ports import free_ports
from openai_frontend.chat_template import ChatTemplate
from python_backend_utils.environment import DEFAULT_MODEL_NAME, default_model_dir
from python_backend_utils.triton_glue.tokenizer import load_tokenizer
from tests.helpers import generate, metric_values, openai_frontend, wait_until

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
MAX_TOKENS = 16  # greedy SmolLM2-135M-Instruct does not reach its end token within these of PROMPT
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def frontend(triton_server, tmp_path_factory):
    with openai_frontend(triton_server, tmp_path_factory.mktemp("openai")) as server:
        yield server


@pytest.fixture(scope="module")
def client(frontend):
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer({})


def rendered_chat(messages) -> str:
    return ChatTemplate.from_checkpoint(default_model_dir()).render(messages)


def test_models_lists_the_checkpoint(client):
    [model] = client.models.list().data
    assert model.id == DEFAULT_MODEL_NAME and model.owned_by == "triton-disagg" and model.created > 0


def test_health(frontend):
    with urllib.request.urlopen(f"{frontend.url}/health", timeout=10) as response:
        assert response.status == 200


def test_greedy_completion_equals_the_generate_endpoint(client, triton_server, tokenizer):
    answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.object == "text_completion" and answer.model == DEFAULT_MODEL_NAME
    [choice] = answer.choices
    assert choice.text == generate(triton_server, "ensemble", PROMPT, MAX_TOKENS)
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert answer.usage.completion_tokens == MAX_TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + MAX_TOKENS


def test_streamed_completion_adds_up_to_the_whole_one(client):
    whole = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_equals_generate_on_the_rendered_prompt(client, triton_server, tokenizer):
    answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=32, temperature=0)
    [choice] = answer.choices
    rendered = rendered_chat(CHAT)
    assert choice.message.role == "assistant"
    assert choice.message.content == generate(triton_server, "ensemble", rendered, 32)
    assert "Paris" in choice.message.content
    assert answer.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    expected_reason = "length" if answer.usage.completion_tokens == 32 else "stop"
    assert choice.finish_reason == expected_reason


def test_streamed_chat_starts_with_the_role_and_adds_up_to_the_whole_answer(client):
    whole = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=32, temperature=0)
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=32,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def test_stop_strings_end_the_answer_before_them(client):
    whole = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    text = whole.choices[0].text
    stop = text[8:12]
    for stream in (False, True):
        answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0, stop=["never appears", stop], stream=stream)
        chunks = list(answer) if stream else [answer]
        assert "".join(c.choices[0].text for c in chunks) == text[: text.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_ignore_eos_and_min_tokens_set_the_answer_length(client):
    short = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=200, temperature=0)
    assert short.choices[0].finish_reason == "stop", "the greedy answer to 'Hi' should end by itself"
    length = short.usage.completion_tokens + 10
    for extra in ({"ignore_eos": True}, {"min_tokens": length}):
        answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=length, temperature=0, extra_body=extra)
        assert answer.usage.completion_tokens == length and answer.choices[0].finish_reason == "length"


def test_completions_stop_at_sixteen_tokens_by_default_as_openai(client):
    answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, temperature=0)
    assert answer.usage.completion_tokens == 16 and answer.choices[0].finish_reason == "length"


def test_content_given_as_text_parts_is_the_same_prompt_as_a_string(client):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": parts}],
                                              max_tokens=8, temperature=0)
    as_text = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[
        {"role": "user", "content": "What is the capital\nof France?"}], max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage == as_text.usage


def test_parameters_that_cannot_change_the_answer_are_accepted(client):
    plain = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    tagged = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0, store=False, metadata={"team": "a"},
        service_tier="auto", user="u-1", safety_identifier="s-1", prompt_cache_key="k", parallel_tool_calls=False)
    assert tagged.choices[0].message.content == plain.choices[0].message.content


def test_an_impossible_parameter_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=8,
                                       modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert refused.value.body["param"] == "modalities" and "text only" in refused.value.body["message"]


def prometheus_samples(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def test_metrics_show_the_time_to_first_token_of_the_requests_just_sent(frontend, client):
    count = f'vllm:time_to_first_token_seconds_count{{model_name="{DEFAULT_MODEL_NAME}"}}'
    before = prometheus_samples(f"{frontend.url}/metrics")
    client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    for _ in range(2):
        list(client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                       stream=True))
    after = prometheus_samples(f"{frontend.url}/metrics")
    assert after[count] == before.get(count, 0) + 3
    label = f'{{model_name="{DEFAULT_MODEL_NAME}"}}'
    assert after[f"vllm:generation_tokens_total{label}"] == before.get(f"vllm:generation_tokens_total{label}", 0) + 12
    assert after[f'vllm:e2e_request_latency_seconds_count{label}'] >= 3
    assert after[f'vllm:inter_token_latency_seconds_count{label}'] > before.get(
        f'vllm:inter_token_latency_seconds_count{label}', 0)
    assert after[f"vllm:num_requests_running{label}"] == 0 and after[f"vllm:num_requests_waiting{label}"] == 0


def test_the_engines_totals_are_prometheus_counters_on_tritons_metrics_port(client, triton_server):
    client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=2)
    with urllib.request.urlopen(f"http://{triton_server.urls.metrics}/metrics", timeout=10) as response:
        types = dict(line.split()[2:4] for line in response.read().decode().splitlines()
                     if line.startswith("# TYPE "))
    assert types["disagg_orchestrator_requests_total"] == "counter"
    assert types["disagg_kv_pulls_completed_total"] == "counter"
    assert types["disagg_kv_blocks_used"] == types["disagg_kv_blocks_total"] == "gauge"


def test_chat_log_probs_come_one_per_token(client):
    answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
                                            logprobs=True)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert all(entry.logprob <= 0 for entry in entries)
    assert "".join(entry.token for entry in entries) == answer.choices[0].message.content


def post(frontend, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{frontend.url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


CHAT_BODY = {"model": DEFAULT_MODEL_NAME, "messages": CHAT, "max_tokens": 4}
MALFORMED = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", {"model": DEFAULT_MODEL_NAME}, "messages"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT_BODY, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**CHAT_BODY, "n": 17}, "n"),  # more choices than MAX_CHOICES
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ("/v1/chat/completions", {**CHAT_BODY, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT_BODY, "frobnicate": True}, "frobnicate"),
    ("/v1/chat/completions", {**CHAT_BODY, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages.0.content.1"),
    ("/v1/chat/completions", {**CHAT_BODY, "min_tokens": 10}, None),  # the engine's own check: min > max
    ("/v1/completions", {"model": DEFAULT_MODEL_NAME, "prompt": [3, 10**7], "max_tokens": 4}, None),  # not a token
    ("/v1/completions", {"model": DEFAULT_MODEL_NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("path, body, param", MALFORMED)
def test_malformed_requests_get_a_400_with_the_openai_error_body_and_the_server_keeps_serving(
        frontend, client, path, body, param):
    status, answer = post(frontend, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=2).choices


def test_an_unknown_model_is_a_404(frontend):
    status, answer = post(frontend, "/v1/chat/completions", json.dumps({**CHAT_BODY, "model": "gpt-9"}).encode())
    assert status == 404 and answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"


def kv_blocks_used(server) -> dict[str, float]:
    return {labels: value for labels, value in metric_values(server, "disagg_kv_blocks_used").items()
            if "context" in labels or "generation" in labels}


def test_a_client_that_disconnects_mid_stream_frees_kv_on_both_sides(frontend, triton_server):
    wait_until(lambda: not any(kv_blocks_used(triton_server).values()), timeout_s=30)
    body = {**CHAT_BODY, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(6):
        response.readline()
    generating = wait_until(lambda: {k: v for k, v in kv_blocks_used(triton_server).items()
                                     if v and "generation" in k}, timeout_s=10)
    assert generating
    connection.sock.shutdown(2)
    connection.close()
    closed = time.monotonic()
    wait_until(lambda: not any(kv_blocks_used(triton_server).values()), timeout_s=10, interval_s=0.05)
    freed_after_s = time.monotonic() - closed
    assert freed_after_s < 1.0, f"KV was freed {freed_after_s:.2f} s after the client went away: over a second"


def test_a_client_that_disconnects_before_a_whole_answer_frees_kv_on_both_sides(frontend, triton_server):
    """Non-streaming: nothing is sent until the answer is done, so the frontend watches for the
    disconnect itself; before it did, the request decoded on to max_tokens (minutes here)."""
    wait_until(lambda: not any(kv_blocks_used(triton_server).values()), timeout_s=30)
    body = {**CHAT_BODY, "max_tokens": 2000, "ignore_eos": True}
    connection = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    generating = wait_until(lambda: {k: v for k, v in kv_blocks_used(triton_server).items()
                                     if v and "generation" in k}, timeout_s=30)
    assert generating
    connection.sock.shutdown(2)
    connection.close()
    closed = time.monotonic()
    wait_until(lambda: not any(kv_blocks_used(triton_server).values()), timeout_s=10, interval_s=0.05)
    freed_after_s = time.monotonic() - closed
    assert freed_after_s < 1.0, f"KV was freed {freed_after_s:.2f} s after the client went away: over a second"


def test_sixteen_concurrent_streaming_chats_all_complete(frontend):
    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": f"Count from {index} to {index + 5}."}],
            max_tokens=16, temperature=0, stream=True)
        content, reason = "", None
        async for chunk in stream:
            content += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return content, reason

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, index) for index in range(16)))

    answers = asyncio.run(all_of_them())
    assert all(content and reason in ("stop", "length") for content, reason in answers), answers


def test_in_aggregated_mode_the_frontend_answers_as_ensemble_aggregated(triton_server, tmp_path):
    [port] = free_ports(1)
    aggregated = OpenAIFrontend(triton_grpc_url=triton_server.urls.grpc, triton_model="aggregated", port=port,
                                host="127.0.0.1", log_file=tmp_path / "frontend.log")
    try:
        aggregated.start()
        client = openai.OpenAI(base_url=f"{aggregated.url}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0)
    finally:
        aggregated.stop()
    assert answer.choices[0].text == generate(triton_server, "ensemble_aggregated", PROMPT, MAX_TOKENS)


def test_with_an_api_key_the_api_answers_only_requests_that_carry_it(triton_server, tmp_path):
    [port] = free_ports(1)
    guarded = OpenAIFrontend(triton_grpc_url=triton_server.urls.grpc, triton_model="disaggregated_serving_bls",
                             port=port, host="127.0.0.1", log_file=tmp_path / "frontend.log", api_key="sesame",
                             served_model_name="my-model")
    try:
        guarded.start()  # /health answers without the key: the start waits for it
        wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="open-please", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.completions.create(model="my-model", prompt=PROMPT, max_tokens=2)
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sesame", max_retries=0)
        assert [model.id for model in right.models.list().data] == ["my-model"]
        answer = right.completions.create(model="my-model", prompt=PROMPT, max_tokens=2, temperature=0)
        assert answer.model == "my-model" and answer.usage.completion_tokens == 2
        with urllib.request.urlopen(f"{guarded.url}/metrics", timeout=10) as response:  # Prometheus has no key
            assert 'model_name="my-model"' in response.read().decode()
    finally:
        guarded.stop()


def test_the_served_benchmark_times_a_whole_streamed_answer(frontend):
    """benchmarks.bench_served, which puts our server beside llama-server, counts what the stream carried."""
    from benchmarks.bench_served import served_model, timed_chat_stream

    address = frontend.url.removeprefix("http://")
    first, last, tokens = timed_chat_stream(address, served_model(address), "Say something.", 8, timeout_s=60)
    assert tokens == 8 and 0 < first <= last
