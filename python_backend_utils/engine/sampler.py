"""The batched sampler: one token per sequence from a step's logits.

It is total: whatever the logits and (validated) settings, every row gets a token, so one
request's numbers can never fail the step its batch shares.
"""

from __future__ import annotations

import torch

from python_backend_utils.engine.sampling_params import SamplingParams


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


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return (token ids, log-probabilities of those tokens).

    Greedy rows take the argmax of the raw distribution; sampled rows draw from the
    temperature-scaled, top-k/top-p-filtered one, each from its own seeded generator so a
    request's draws do not depend on what it is batched with. A sampled row whose scaled logits
    are not a distribution (a temperature so small that logits/T overflows, NaN logits) is
    greedy for that step.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    # log_softmax at the chosen token only: no second vocabulary-sized tensor per step.
    chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    for row in sampled_rows:
        scaled = _filtered(logits[row], params[row])
        if scaled is None:
            continue
        probs = torch.softmax(scaled, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generators[row]).squeeze(0)
        chosen[row] = scaled[tokens[row]] - torch.logsumexp(scaled, dim=-1)
    return tokens, chosen


def _filtered(row_logits: torch.Tensor, p: SamplingParams) -> torch.Tensor | None:
    """The row's temperature-scaled, top-k/top-p-filtered logits; None when they cannot be sampled."""
    scaled = row_logits / p.temperature
    if torch.isnan(scaled).any() or torch.isposinf(scaled).any() or torch.isneginf(scaled).all():
        return None
    if p.top_k > 0:
        kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    return scaled
