"""One client cannot hurt the others: a request whose settings break its own sampling is answered
(or refused) alone, while the requests batched with it are answered as if it had never come."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import PROMPTS, generate, post_json

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("model", ["ensemble", "ensemble_aggregated"])
def test_a_tiny_temperature_with_others_in_flight_answers_everyone(triton_server, aggregated_answers, model):
    """logits / 1e-38 overflows: once it failed the shared step, and every request in it."""
    url = f"http://{triton_server.urls.http}/v2/models/{model}/generate"
    tiny = {"text_input": PROMPTS[1], "max_tokens": 12, "exclude_input_in_output": True, "temperature": 1e-38}
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        others = {prompt: pool.submit(generate, triton_server, model, prompt) for prompt in PROMPTS}
        tiny_answer = pool.submit(post_json, url, tiny)
        answers = {prompt: future.result() for prompt, future in others.items()}
        tiny_text = json.loads(tiny_answer.result())["text_output"]
    assert answers == aggregated_answers
    assert tiny_text == aggregated_answers[PROMPTS[1]]  # below 1e-5 a temperature is greedy
