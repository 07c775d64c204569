"""Per-request sampling settings and the batched sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from python_backend_utils.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding. temperature 0 (the default) or top_k 1 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None  # accepted for TensorRT-LLM compatibility and checked; nothing is padded
    stop_words: tuple[tuple[int, ...], ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    return_log_probs: bool = False
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, prompt_len: int, max_model_len: int, vocab_size: int) -> None:
        if prompt_len <= 0:
            raise InvalidRequestError("the prompt is empty: send at least one token")
        if prompt_len >= max_model_len:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens, the model's context window is {max_model_len}: "
                f"shorten it to at most {max_model_len - 1} tokens"
            )
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds the context window "
                f"of {max_model_len}: ask for at most {max_model_len - prompt_len} tokens"
            )
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for value, name in ((self.end_id, "end_id"), (self.pad_id, "pad_id")):
            if value is not None and not 0 <= value < vocab_size:
                raise InvalidRequestError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
        for words, name in ((self.stop_words, "stop_words"), (self.bad_words, "bad_words")):
            for word in words:
                if not word:
                    raise InvalidRequestError(f"{name} holds an empty word (an empty string tokenizes to nothing)")
                check_token_ids(word, vocab_size, name)


def check_token_ids(token_ids: Sequence[int], vocab_size: int, name: str) -> None:
    """Refuse ids the model has no embedding for: one would fail the whole batch it lands in."""
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) < vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidRequestError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def apply_bad_words(logits: torch.Tensor, histories: list[list[int]], bad_words: list[tuple[tuple[int, ...], ...]]) -> None:
    """Ban the last token of every bad word whose other tokens end the history (in place)."""
    for row, (history, words) in enumerate(zip(histories, bad_words)):
        for word in words:
            prefix = list(word[:-1])
            if not prefix or history[-len(prefix):] == prefix:
                logits[row, word[-1]] = float("-inf")


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return (token ids, log-probabilities of those tokens).

    Greedy rows take the argmax of the raw distribution; sampled rows draw from the
    temperature-scaled, top-k/top-p-filtered one, each from its own seeded generator so a
    request's draws do not depend on what it is batched with.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    for row in sampled_rows:
        p = params[row]
        scaled = logits[row] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            scaled = scaled.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
        probs = torch.softmax(scaled, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generators[row]).squeeze(0)
        logprobs[row] = torch.log_softmax(scaled, dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, chosen
