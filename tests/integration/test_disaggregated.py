"""Disaggregated serving on a real tritonserver: same tokens as the aggregated path, streamed the same way."""

from __future__ import annotations

import urllib.error
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client.generate import GenerateRequest, infer_inputs
from tests.helpers import PROMPTS, generate, metric_values, post_json, stream_results, wait_for_idle_kv

pytestmark = pytest.mark.integration


def test_disaggregated_output_equals_aggregated_for_every_prompt_length(triton_server, aggregated_answers):
    for prompt in PROMPTS:
        assert generate(triton_server, "ensemble", prompt) == aggregated_answers[prompt], prompt


def test_concurrent_mixed_requests_keep_their_tokens(triton_server, aggregated_answers):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: generate(triton_server, "ensemble", p), PROMPTS * 2))
    assert answers == [aggregated_answers[p] for p in PROMPTS * 2]


def test_streamed_disaggregated_text_is_the_aggregated_text_one_token_at_a_time(triton_server, aggregated_answers):
    prompt = PROMPTS[1]
    request = GenerateRequest(prompt, max_tokens=12, stream=True)
    results = stream_results(triton_server.urls.grpc, "ensemble", infer_inputs(request.arrays()))
    pieces = [r.as_numpy("text_output").reshape(-1)[0].decode() for r in results]
    assert "".join(pieces) == aggregated_answers[prompt]
    assert len(pieces) >= 10  # one response per token (a few may hold back a partial character)


def test_first_token_of_a_one_token_request_comes_from_the_context_instance(triton_server, aggregated_answers):
    """The context instance answers it alone: the orchestrator counts it, no generation instance pulls its KV
    or prefills it."""
    untouched = ("disagg_kv_pulls_completed_total", "disagg_orchestrator_local_prefill_total",
                 "disagg_orchestrator_context_fallbacks_total")

    def totals() -> dict[str, float]:
        names = ("disagg_orchestrator_requests_total", *untouched)
        return {name: sum(metric_values(triton_server, name).values()) for name in names}

    before = totals()
    answer = generate(triton_server, "ensemble", PROMPTS[1], max_tokens=1)
    after = totals()
    assert answer == generate(triton_server, "ensemble_aggregated", PROMPTS[1], max_tokens=1)
    assert after["disagg_orchestrator_requests_total"] == before["disagg_orchestrator_requests_total"] + 1
    assert {name: after[name] for name in untouched} == {name: before[name] for name in untouched}


def test_bad_input_through_the_orchestrator_is_the_clients_error(triton_server):
    body = {"text_input": "Hello", "max_tokens": 0}
    with pytest.raises(urllib.error.HTTPError, match="400") as error:
        post_json(f"http://{triton_server.urls.http}/v2/models/ensemble/generate", body)
    assert "max_tokens" in error.value.read().decode()
    assert generate(triton_server, "ensemble", PROMPTS[0], max_tokens=2)


def test_log_probs_match_between_paths(triton_server):
    request = GenerateRequest(PROMPTS[1], max_tokens=6, stream=False)
    arrays = {**request.arrays(), "return_log_probs": np.array([[True]])}
    [disaggregated] = stream_results(triton_server.urls.grpc, "ensemble", infer_inputs(arrays))
    [aggregated] = stream_results(triton_server.urls.grpc, "ensemble_aggregated", infer_inputs(arrays))
    np.testing.assert_allclose(
        disaggregated.as_numpy("output_log_probs"), aggregated.as_numpy("output_log_probs"), rtol=1e-4, atol=1e-5
    )


def test_metrics_show_transfers_and_every_block_returns(triton_server):
    before = sum(metric_values(triton_server, "disagg_kv_pulls_completed_total").values())
    generate(triton_server, "ensemble", PROMPTS[4])
    used = wait_for_idle_kv(triton_server)
    assert used and all(v == 0 for v in used.values()), used
    assert sum(metric_values(triton_server, "disagg_kv_pulls_completed_total").values()) >= before + 1
    assert sum(metric_values(triton_server, "disagg_kv_bytes_received_total").values()) > 0
    assert sum(metric_values(triton_server, "disagg_orchestrator_disaggregated_total").values()) >= 1
    routed = metric_values(triton_server, "disagg_router_in_flight")
    assert any('worker="context/1"' in labels for labels in routed), routed
    # Off by default: they would show clients where, and whether, others' prompts share a prefix.
    assert not metric_values(triton_server, "disagg_router_decisions_total")
    assert not metric_values(triton_server, "disagg_prefix_cache_hit_tokens_total")
