"""A deployment with two context and two generation instances, rendered like `disagg-serve --deployment`.

The context router is KV-cache aware, the generation router balances requests, short prompts
skip the context instances, and unclaimed KV expires after a few seconds. The aggregated
answers come from the session server (same model, same fp32 KV, greedy).
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client.generate import GenerateRequest, infer_inputs
from launcher import TritonServer
from launcher.ports import free_server_ports
from launcher.repository import Setting, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from python_backend_utils.triton_glue.tokenizer import load_tokenizer
from tests.helpers import FP32_SETTINGS, PROMPTS, generate, metric_values, wait_until

pytestmark = pytest.mark.integration

MIN_DISAGGREGATED_PROMPT_TOKENS = 8
HANDLE_TTL_S = 3
GENERATION_MAX_NUM_SEQS = 2

DEPLOYMENT = f"""\
context_servers:
  num_instances: 2
  router: {{type: kv_cache_aware}}
generation_servers:
  num_instances: 2
  router: {{type: load_balancing, load_metric: requests}}
min_disaggregated_prompt_tokens: {MIN_DISAGGREGATED_PROMPT_TOKENS}
context_timeout_s: 30
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("deployment")
    (work / "deployment.yaml").write_text(DEPLOYMENT)
    repository = work / "model_repository"
    settings = [f"context.kv_handle_ttl_s={HANDLE_TTL_S}", f"generation.max_num_seqs={GENERATION_MAX_NUM_SEQS}"] + [
        f"{model}.kv_cache_memory_bytes={128 << 20}" for model in ("context", "generation")
    ] + [f"{model}.detailed_metrics=true" for model in ("context", "disaggregated_serving_bls")]  # routing, hits
    settings += FP32_SETTINGS
    render_repository(DEFAULT_MODEL_REPOSITORY, repository, work / "deployment.yaml",
                      tuple(map(Setting.parse, settings)))
    triton = TritonServer(
        repository,
        **free_server_ports(),
        models=["ensemble", "context", "generation"],
        log_file=work / "server.log",
    )
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


def instance_values(server, metric: str, model: str) -> dict[int, float]:
    """One metric per instance (version) of a model."""
    values = metric_values(server, metric)
    return {v: values.get(f'{{model="{model}",version="{v}"}}', 0.0) for v in (1, 2)}


def decisions(server, model: str) -> dict[int, float]:
    values = metric_values(server, "disagg_router_decisions_total")
    return {v: sum(n for labels, n in values.items() if f'worker="{model}/{v}"' in labels) for v in (1, 2)}


def orchestrator_count(server, name: str) -> float:
    return sum(metric_values(server, f"disagg_orchestrator_{name}").values())


def kv_blocks_used(server) -> dict[str, float]:
    return {
        f"{model}/{version}": used
        for model in ("context", "generation")
        for version, used in instance_values(server, "disagg_kv_blocks_used", model).items()
    }


def test_every_prompt_matches_aggregated_with_two_instances_of_each(server, aggregated_answers):
    before = decisions(server, "generation")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: generate(server, "ensemble", p), PROMPTS * 2))
    assert answers == [aggregated_answers[p] for p in PROMPTS * 2]
    after = wait_until(lambda: (d := decisions(server, "generation")) and sum(d.values()) >= sum(before.values()) + 12
                       and d, timeout_s=10)
    assert all(after[v] > before[v] for v in (1, 2)), (before, after)  # load balancing used both


def test_short_prompts_skip_the_context_instances(server, aggregated_answers):
    short = PROMPTS[0]
    assert len(load_tokenizer({}).encode(short)) < MIN_DISAGGREGATED_PROMPT_TOKENS
    local_before, context_before = orchestrator_count(server, "local_prefill_total"), decisions(server, "context")
    assert generate(server, "ensemble", short) == aggregated_answers[short]
    wait_until(lambda: orchestrator_count(server, "local_prefill_total") == local_before + 1, timeout_s=10)
    assert decisions(server, "context") == context_before


def test_a_repeated_prompt_goes_back_to_the_instance_holding_its_prefix(server, aggregated_answers):
    long_prompts = [PROMPTS[4], PROMPTS[5]]
    first_choice = {}
    for prompt in long_prompts:
        before = decisions(server, "context")
        generate(server, "ensemble", prompt, max_tokens=2)
        after = wait_until(lambda before=before: (d := decisions(server, "context")) != before and d, timeout_s=10)
        [first_choice[prompt]] = [v for v in (1, 2) if after[v] > before[v]]
    for prompt in long_prompts * 2:
        before = decisions(server, "context")
        hits_before = instance_values(server, "disagg_prefix_cache_hit_tokens_total", "context")
        assert generate(server, "ensemble", prompt) == aggregated_answers[prompt]
        after = wait_until(lambda before=before: (d := decisions(server, "context")) != before and d, timeout_s=10)
        chosen = first_choice[prompt]
        assert after[chosen] == before[chosen] + 1, (prompt[:20], before, after)
        hits = wait_until(lambda chosen=chosen, hits_before=hits_before: (
            h := instance_values(server, "disagg_prefix_cache_hit_tokens_total", "context"))[chosen]
            > hits_before[chosen] and h, timeout_s=10)
        assert hits[chosen] - hits_before[chosen] >= 16  # at least one full block was not recomputed


def test_the_first_token_reaches_the_client_before_its_kv_is_transferred(server, aggregated_answers):
    """Order of events: while both generation instances are full, no pull can even start; the
    first token must reach the client anyway. Then the instances free up and the rest follows."""
    blockers = grpcclient.InferenceServerClient(server.urls.grpc)
    blocked: queue.Queue = queue.Queue()
    blockers.start_stream(callback=lambda result, error: blocked.put((result, error)))
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    pieces: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    try:
        long_request = {**context_request([1, 2, 3, 4]), "request_output_len": np.array([2000], dtype=np.int32)}
        for version in (1, 2):
            for _ in range(GENERATION_MAX_NUM_SEQS):
                blockers.async_stream_infer("generation", infer_inputs(long_request), model_version=str(version))
        for _ in range(2 * GENERATION_MAX_NUM_SEQS):  # every blocker is decoding: both instances are full
            assert blocked.get(timeout=60)[1] is None
        pulls_before = sum(instance_values(server, "disagg_kv_pulls_completed_total", "generation").values())

        prompt = PROMPTS[4]  # long enough to be disaggregated
        client.async_stream_infer("ensemble", infer_inputs(GenerateRequest(prompt, max_tokens=12, stream=True).arrays()))
        result, error = pieces.get(timeout=60)
        assert error is None, (error.status(), error.message())
        text = result.as_numpy("text_output").reshape(-1)[0].decode()
        assert text and aggregated_answers[prompt].startswith(text)
        wait_until(lambda: sum(instance_values(server, "disagg_sequences_waiting", "generation").values()) >= 1, 10)
        assert sum(instance_values(server, "disagg_kv_pulls_completed_total", "generation").values()) == pulls_before
    finally:
        blockers.stop_stream(cancel_requests=True)
        blockers.close()
    while text != aggregated_answers[prompt]:
        result, error = pieces.get(timeout=60)
        assert error is None, error
        text += result.as_numpy("text_output").reshape(-1)[0].decode()
    client.stop_stream()
    client.close()


def context_request(prompt_ids: list[int]) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array(prompt_ids, dtype=np.int32),
        "request_output_len": np.array([8], dtype=np.int32),
        "streaming": np.array([True]),
    }


def test_kv_nobody_pulls_is_freed_at_its_ttl(server):
    prompt_ids = load_tokenizer({}).encode(PROMPTS[5])
    expired_before = instance_values(server, "disagg_kv_handles_expired_total", "context")[1]
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("context", infer_inputs(context_request(prompt_ids)), model_version="1")
    result, error = answers.get(timeout=60)
    client.stop_stream()
    client.close()
    assert error is None, error
    assert result.as_numpy("context_phase_params").size > 0
    published = time.monotonic()
    pinned = wait_until(lambda: instance_values(server, "disagg_kv_pinned_blocks", "context")[1], timeout_s=5)
    assert pinned == -(-len(prompt_ids) // 16)
    wait_until(lambda: instance_values(server, "disagg_kv_pinned_blocks", "context")[1] == 0, timeout_s=HANDLE_TTL_S + 5)
    assert time.monotonic() - published >= HANDLE_TTL_S - 1  # held until the TTL, not dropped at once
    assert instance_values(server, "disagg_kv_handles_expired_total", "context")[1] == expired_before + 1
    wait_until(lambda: kv_blocks_used(server)["context/1"] == 0, timeout_s=5)


def test_cancelling_a_disaggregated_stream_frees_its_kv_on_both_sides(server):
    prompt_ids = load_tokenizer({}).encode(PROMPTS[5])
    arrays = {**context_request(prompt_ids), "request_output_len": np.array([2000], dtype=np.int32)}
    client = grpcclient.InferenceServerClient(server.urls.grpc)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("disaggregated_serving_bls", infer_inputs(arrays))
    for _ in range(3):
        result, error = responses.get(timeout=60)
        assert error is None, error
    generating = wait_until(lambda: {k: v for k, v in kv_blocks_used(server).items() if v and "generation" in k},
                            timeout_s=5)
    assert sum(generating.values()) >= -(-len(prompt_ids) // 16)
    client.stop_stream(cancel_requests=True)
    client.close()
    cancelled = time.monotonic()
    wait_until(lambda: not any(kv_blocks_used(server).values()), timeout_s=5, interval_s=0.05)
    freed_after_s = time.monotonic() - cancelled
    assert freed_after_s < 1.0, f"KV was freed {freed_after_s:.2f} s after the cancellation: over a second"
    assert orchestrator_count(server, "cancelled_total") >= 1
