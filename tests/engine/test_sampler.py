"""The batched sampler against transformers' logits processors: same logits, same processed logits,
same choice."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from python_backend_utils.engine.sampler import apply_penalties, sample, sampling_logits, seeded_uniforms
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.errors import InvalidRequestError

VOCAB = 64
ROWS = 4


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def histories() -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, 12), generator=torch.Generator().manual_seed(1))


def penalized(logits, histories, num_prompt_tokens: int, **settings) -> torch.Tensor:
    out = logits.clone()
    apply_penalties(out, histories.tolist(), [num_prompt_tokens] * ROWS, [SamplingParams(**settings)] * ROWS)
    return out


def assert_same_processing(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    finite = ~torch.isneginf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_transformers(logits, histories, penalty):
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(histories, logits.clone())
    ours = penalized(logits, histories, num_prompt_tokens=5, repetition_penalty=penalty)
    assert_same_processing(ours, theirs)
    assert not torch.equal(ours, logits)


def test_logit_bias_is_transformers_sequence_bias(logits, histories):
    bias = ((3, 5.0), (17, -100.0), (40, 2.5))
    theirs = SequenceBiasLogitsProcessor({(token,): value for token, value in bias})(histories, logits.clone())
    assert_same_processing(penalized(logits, histories, 5, logit_bias=bias), theirs)


def test_frequency_and_presence_penalties_count_only_generated_tokens(logits, histories):
    """OpenAI's definition: logit - count * frequency - (count > 0) * presence, count over the output."""
    prompt = 5
    ours = penalized(logits, histories, prompt, frequency_penalty=0.5, presence_penalty=0.8)
    expected = logits.clone()
    for row in range(ROWS):
        counts = torch.bincount(histories[row, prompt:], minlength=VOCAB).float()
        expected[row] -= 0.5 * counts + 0.8 * (counts > 0)
    assert_same_processing(ours, expected)
    prompt_only = set(histories[0, :prompt].tolist()) - set(histories[0, prompt:].tolist())
    assert prompt_only and all(ours[0, t] == logits[0, t] for t in prompt_only)


@pytest.mark.parametrize("settings, warpers", [
    ({"temperature": 0.7, "min_p": 0.1}, [TemperatureLogitsWarper(0.7), MinPLogitsWarper(0.1)]),
    ({"temperature": 1.3, "top_k": 5}, [TemperatureLogitsWarper(1.3), TopKLogitsWarper(5)]),
    ({"temperature": 0.9, "top_p": 0.6}, [TemperatureLogitsWarper(0.9), TopPLogitsWarper(0.6)]),
    ({"temperature": 1.0, "top_k": 20, "top_p": 0.8},
     [TemperatureLogitsWarper(1.0), TopKLogitsWarper(20), TopPLogitsWarper(0.8)]),
], ids=["min_p", "top_k", "top_p", "top_k+top_p"])
def test_sampled_rows_draw_from_transformers_warped_distribution(logits, histories, settings, warpers):
    theirs = logits.clone()
    for warper in warpers:
        theirs = warper(histories, theirs)
    ours, valid = sampling_logits(logits, [SamplingParams(**settings)] * ROWS)
    assert valid.all()
    assert_same_processing(ours, theirs)
    # and every draw lands in what is left
    for seed in range(20):
        tokens = sample(logits, [SamplingParams(**settings)] * ROWS, seeded_uniforms([seed] * ROWS, [0] * ROWS)).tokens
        assert not torch.isneginf(theirs.gather(1, tokens.unsqueeze(1))).any()


def test_seeded_draws_follow_the_distribution_and_ignore_the_batch():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    params = [SamplingParams(temperature=1.0)]
    draws = [int(sample(logits, params, seeded_uniforms([seed], [3])).tokens) for seed in range(4000)]
    frequencies = [draws.count(token) / len(draws) for token in range(4)]
    assert frequencies == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.025)
    batch = torch.cat([torch.randn(2, 4), logits])
    batched = sample(batch, [SamplingParams(temperature=0.5, seed=9)] * 2 + params,
                     seeded_uniforms([1, 2, 77], [0, 5, 3])).tokens
    assert int(batched[2]) == draws[77]


def test_top_log_probs_are_the_model_distributions(logits):
    params = [SamplingParams(top_logprobs=5), SamplingParams(top_logprobs=2, temperature=0.8)] + [SamplingParams()] * 2
    picked = sample(logits, params, seeded_uniforms([0] * ROWS, [0] * ROWS))
    expected = torch.log_softmax(logits, dim=-1).topk(5)
    assert torch.equal(picked.top_ids, expected.indices)
    torch.testing.assert_close(picked.top_log_probs, expected.values)
    assert picked.log_probs[0] == pytest.approx(float(expected.values[0, 0]), abs=1e-6)  # greedy: the top one
    sampled = int(picked.tokens[1])
    assert picked.log_probs[1] == pytest.approx(float(torch.log_softmax(logits[1], -1)[sampled]), abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": ((3, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((VOCAB, 1.0),)}, "logit_bias"),
])
def test_bad_settings_are_refused_with_their_name(settings, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**settings).validate(5, 100, VOCAB)
