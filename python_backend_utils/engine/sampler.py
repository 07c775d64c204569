"""The batched sampler: one token per sequence from a step's logits.

Every stage works on all the rows that need it at once (tensor ops over rows, no loop over
requests): bad words, penalties and biases change the logits in place; `sample` then picks.
It is total: whatever the logits and (validated) settings, every row gets a token, so one
request's numbers can never fail the step its batch shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from python_backend_utils.engine.sampling_params import SamplingParams

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


@dataclass(frozen=True)
class SampledTokens:
    """One step's picks. Log-probabilities are the model's (log-softmax of the logits after bad
    words, penalties and biases, before temperature and filtering), as vLLM reports them."""

    tokens: torch.Tensor  # [rows]
    log_probs: torch.Tensor  # [rows]: each chosen token's
    top_ids: torch.Tensor  # [rows, K], K the largest top_logprobs of the batch (0 columns when none asked)
    top_log_probs: torch.Tensor  # [rows, K]


def apply_bad_words(logits: torch.Tensor, histories: list[list[int]],
                    bad_words: list[tuple[tuple[int, ...], ...]]) -> list[int]:
    """Ban the last token of every bad word whose other tokens end the history (in place).

    Returns the rows where that banned every token: there is nothing left to generate.
    """
    for row, (history, words) in enumerate(zip(histories, bad_words)):
        for word in words:
            prefix = list(word[:-1])
            if not prefix or history[-len(prefix):] == prefix:
                logits[row, word[-1]] = float("-inf")
    rows = [row for row, words in enumerate(bad_words) if words]
    return [row for row in rows if bool(torch.isneginf(logits[row]).all())]


def seeded_uniforms(seeds: list[int], steps: list[int]) -> torch.Tensor:
    """One uniform number in [0, 1) per row: splitmix64's `step`-th output for `seed`.

    A pure function of (seed, output position), so a seeded request draws the same tokens alone or
    batched, and whether its first token was drawn on a context instance and the rest elsewhere.
    """
    state = np.asarray(seeds, dtype=np.uint64) + (np.asarray(steps, dtype=np.uint64) + np.uint64(1)) * _GOLDEN_GAMMA
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state ^= state >> np.uint64(31)
    return torch.from_numpy((state >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def apply_penalties(logits: torch.Tensor, histories: list[list[int]], num_prompt_tokens: list[int],
                    params: list[SamplingParams]) -> None:
    """logit_bias, then the repetition penalty (over prompt and output), then the frequency and
    presence penalties (over output), in place, on the rows that ask for any (vLLM's order).

    Each touches only the (row, token) pairs concerned: the cost follows the histories, not the vocabulary.
    """
    rows = [row for row, p in enumerate(params) if p.penalized]
    if not rows:
        return
    biased = [(row, token, bias) for row in rows for token, bias in params[row].logit_bias]
    if biased:
        row_ids, token_ids, biases = zip(*biased)
        logits.index_put_((torch.tensor(row_ids, device=logits.device), torch.tensor(token_ids, device=logits.device)),
                          torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)
    repeated = [row for row in rows if params[row].repetition_penalty != 1.0]
    if repeated:
        row_ids, token_ids, _ = _token_counts({row: histories[row] for row in repeated}, logits.shape[1], logits.device)
        penalty = torch.tensor([params[row].repetition_penalty for row in row_ids.tolist()], dtype=logits.dtype,
                               device=logits.device)
        seen = logits[row_ids, token_ids]
        logits[row_ids, token_ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    counted = [row for row in rows if params[row].frequency_penalty != 0.0 or params[row].presence_penalty != 0.0]
    if counted:
        outputs = {row: histories[row][num_prompt_tokens[row]:] for row in counted}
        row_ids, token_ids, counts = _token_counts(outputs, logits.shape[1], logits.device)
        settings = [(params[row].frequency_penalty, params[row].presence_penalty) for row in row_ids.tolist()]
        frequency, presence = torch.tensor(settings, dtype=logits.dtype, device=logits.device).reshape(-1, 2).unbind(1)
        logits[row_ids, token_ids] -= frequency * counts.to(logits.dtype) + presence


def _token_counts(histories: dict[int, list[int]], vocab_size: int, device) -> tuple[torch.Tensor, ...]:
    """(row, token, count) of every distinct token of each row's history, as three tensors."""
    keys = torch.tensor([row * vocab_size + token for row, history in histories.items() for token in history],
                        dtype=torch.long, device=device)
    distinct, counts = torch.unique(keys, return_counts=True)
    return distinct // vocab_size, distinct % vocab_size, counts


def sample(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> SampledTokens:
    """Pick one token per row.

    Greedy rows take the argmax; sampled rows draw from the temperature-scaled, min-p, top-k and
    top-p filtered distribution by inverting its CDF at the row's uniform number (seeded_uniforms).
    A sampled row whose scaled logits are not a distribution (a temperature so small that logits/T
    overflows, NaN logits) is greedy for that step.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        drawn = _draw(logits[index], [params[row] for row in sampled_rows], uniforms[index].to(logits.device))
        tokens[index] = torch.where(drawn >= 0, drawn, tokens[index])
    # log_softmax at the chosen (and top) tokens only: no second vocabulary-sized tensor per step.
    normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = (logits.gather(1, tokens.unsqueeze(1)) - normalizer).squeeze(1)
    top = max(p.top_logprobs for p in params)
    top_values, top_ids = logits.topk(top, dim=-1) if top else (logits[:, :0], tokens[:, None][:, :0])
    return SampledTokens(tokens, chosen, top_ids, top_values - normalizer)


def _draw(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row drawn at `uniforms`; -1 where the scaled logits are no distribution."""
    scaled, valid = sampling_logits(logits, params)
    probs = torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[1] - 1)
    # Rounding can put the target past the last step of the CDF: take the likeliest token there.
    drawn = torch.where(probs.gather(1, drawn.unsqueeze(1)).squeeze(1) > 0, drawn, probs.argmax(dim=-1))
    return torch.where(valid, drawn, torch.full_like(drawn, -1))


def sampling_logits(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits sampled rows draw from: temperature-scaled, then min-p, top-k and top-p filtered;
    whether each row is a distribution at all)."""
    scaled = logits / torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
    valid = ~(torch.isnan(scaled).any(-1) | torch.isposinf(scaled).any(-1) | torch.isneginf(scaled).all(-1))
    scaled = torch.where(valid.unsqueeze(1), scaled, torch.zeros_like(scaled))
    return _top_k_top_p_filtered(_min_p_filtered(scaled, params), params), valid


def _min_p_filtered(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the likeliest one's (vLLM's min_p)."""
    min_p = torch.tensor([p.min_p for p in params], device=scaled.device).unsqueeze(1)
    if not bool((min_p > 0).any()):
        return scaled
    probs = torch.softmax(scaled, dim=-1)
    return scaled.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def _top_k_top_p_filtered(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Keep each row's top_k likeliest tokens (ties included), then the smallest set of those whose
    probability reaches top_p."""
    vocab = scaled.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=scaled.device)
    top_p = torch.tensor([p.top_p for p in params], device=scaled.device).unsqueeze(1)
    if bool((top_k == vocab).all()) and bool((top_p >= 1.0).all()):
        return scaled
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if bool((top_p < 1.0).any()):
        sorted_probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, float("-inf")), dim=-1)
        remove_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        scaled = scaled.masked_fill(torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted), float("-inf"))
    return scaled
