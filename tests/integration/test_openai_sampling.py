"""Per-request sampling through the OpenAI frontend on a real tritonserver, against transformers:
n choices, top log-probabilities, penalties and biases, the same in disaggregated and aggregated modes."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from python_backend_utils.environment import DEFAULT_MODEL_NAME, default_model_dir
from python_backend_utils.triton_glue.tokenizer import load_tokenizer
from tests.helpers import openai_frontend

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def clients(triton_server, tmp_path_factory):
    """An OpenAI client per mode: "disaggregated" and "aggregated"."""
    with (openai_frontend(triton_server, tmp_path_factory.mktemp("disaggregated")) as disaggregated,
          openai_frontend(triton_server, tmp_path_factory.mktemp("aggregated"), "aggregated") as aggregated):
        yield {mode: openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)
               for mode, frontend in (("disaggregated", disaggregated), ("aggregated", aggregated))}


@pytest.fixture(scope="module")
def client(clients):
    return clients["disaggregated"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer({})


@pytest.fixture(scope="module")
def reference():
    """The served checkpoint in transformers, fp32 as the server runs it."""
    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def plain(reference, tokenizer) -> list[int]:
    """transformers' greedy answer to PROMPT, nothing penalized."""
    return reference_greedy(reference, tokenizer.encode(PROMPT), [])


@torch.inference_mode()
def reference_greedy(model, prompt_ids: list[int], processors: list, max_tokens: int = MAX_TOKENS) -> list[int]:
    ids = torch.tensor([prompt_ids])
    for _ in range(max_tokens):
        logits = model(ids).logits[:, -1].float()
        for processor in processors:
            logits = processor(ids, logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties (transformers has none), over the generated tokens."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1]).float()
        return scores - self.frequency * counts - self.presence * (counts > 0)


def completion_text(client, prompt_ids: list[int], extra: dict | None = None, temperature: float = 0,
                    **settings) -> str:
    """The answer to `prompt_ids` (greedy unless told), `extra` holding vLLM's extensions."""
    answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt_ids, max_tokens=MAX_TOKENS,
                                       temperature=temperature, extra_body={"ignore_eos": True, **(extra or {})},
                                       **settings)
    return answer.choices[0].text


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_n_greedy_choices_are_equal_streaming_or_not(client):
    one = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    three = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                           temperature=0, n=3)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert {choice.message.content for choice in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    whole = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert set(streamed.values()) == {whole.choices[0].text}


def test_seeded_choices_differ_and_repeat(client):
    settings = dict(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, n=3)
    first, again = (client.completions.create(**settings) for _ in range(2))
    texts = [choice.text for choice in first.choices]
    assert texts == [choice.text for choice in again.choices] and len(set(texts)) > 1


def test_top_logprobs_are_transformers_top_five(client, tokenizer, reference):
    prompt_ids = tokenizer.encode(PROMPT)
    answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt_ids, max_tokens=3, temperature=0,
                                       logprobs=5)
    chat = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=5)
    chat_ids = tokenizer.encode(reference_chat_prompt(), add_special_tokens=False)
    for ids, tops in ((prompt_ids, [list(top.items()) for top in answer.choices[0].logprobs.top_logprobs]),
                      (chat_ids, [[(t.token, t.logprob) for t in entry.top_logprobs]
                                  for entry in chat.choices[0].logprobs.content])):
        generated = reference_greedy(reference, ids, [], max_tokens=3)
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + generated])).logits[0, len(ids) - 1: len(ids) + 2]
        expected = torch.log_softmax(logits.float(), dim=-1).topk(5)
        for position, top in enumerate(tops):
            assert [token for token, _ in top][:5] == [token_text(tokenizer, t)
                                                       for t in expected.indices[position].tolist()]
            assert [lp for _, lp in top][:5] == pytest.approx(expected.values[position].tolist(), abs=2e-3)


def reference_chat_prompt() -> str:
    from openai_frontend.chat_template import ChatTemplate

    return ChatTemplate.from_checkpoint(default_model_dir()).render(CHAT)


@pytest.mark.parametrize("settings, processors", [
    ({"extra": {"repetition_penalty": 1.5}}, lambda n: [RepetitionPenaltyLogitsProcessor(1.5)]),
    ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, lambda n: [OpenAIPenalties(n, 0.5, 1.5)]),
    ({"logit_bias": {"-": 0}}, None),  # filled in below: the reference answer's second token, banned
], ids=["repetition", "frequency+presence", "logit_bias"])
def test_each_penalty_changes_the_answer_as_transformers_processors_do(client, tokenizer, reference, plain, settings,
                                                                       processors):
    prompt_ids = tokenizer.encode(PROMPT)
    if processors is None:
        banned = plain[1]
        settings = {"logit_bias": {str(banned): -100}}
        processors = lambda n: [SequenceBiasLogitsProcessor({(banned,): -100.0})]  # noqa: E731
    expected = reference_greedy(reference, prompt_ids, processors(len(prompt_ids)))
    assert expected != plain  # the setting matters for this prompt
    assert completion_text(client, prompt_ids, **settings) == tokenizer.decode(expected)


def test_disaggregated_equals_aggregated_with_every_setting(clients, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    settings = {"frequency_penalty": 0.4, "presence_penalty": 0.3, "logit_bias": {str(prompt_ids[-1]): 2.0},
                "extra": {"repetition_penalty": 1.2, "min_p": 0.05}}
    greedy = {mode: completion_text(c, prompt_ids, **settings) for mode, c in clients.items()}
    sampled = {mode: completion_text(c, prompt_ids, temperature=1.0, seed=5, top_p=0.95, **settings)
               for mode, c in clients.items()}
    assert greedy["disaggregated"] == greedy["aggregated"]
    assert sampled["disaggregated"] == sampled["aggregated"]


def test_bad_sampling_settings_are_a_400_naming_them(client):
    for settings, name in (({"logit_bias": {"999999": 1}}, "logit_bias"), ({"logit_bias": {"5": 300}}, "logit_bias"),
                           ({"presence_penalty": 3}, "presence_penalty")):
        with pytest.raises(openai.BadRequestError, match=name):
            client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=2, **settings)


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_echo_with_logprobs_gives_the_prompts_log_probs_as_transformers(clients, tokenizer, reference, mode):
    """As lm-eval's loglikelihood tasks ask: echo, logprobs, max_tokens 1; the first token's is null."""
    prompt_ids = tokenizer.encode(PROMPT)
    answer = clients[mode].completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=1, temperature=0,
                                              echo=True, logprobs=2)
    [choice] = answer.choices
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt_ids) + 1
    assert logprobs.tokens[: len(prompt_ids)] == [token_text(tokenizer, t) for t in prompt_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    with torch.inference_mode():
        expected = torch.log_softmax(reference(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)
    wanted = [float(expected[i, prompt_ids[i + 1]]) for i in range(len(prompt_ids) - 1)]
    assert logprobs.token_logprobs[1: len(prompt_ids)] == pytest.approx(wanted, abs=2e-3)
    for position in range(1, len(prompt_ids)):
        top_two = [token_text(tokenizer, t) for t in expected[position - 1].topk(2).indices.tolist()]
        assert set(top_two) <= set(logprobs.top_logprobs[position])
    assert logprobs.token_logprobs[-1] == pytest.approx(float(expected[-1].max()), abs=2e-3)  # the greedy answer's
