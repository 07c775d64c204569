"""What the engine reports for a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # produced since the last output for this request
    log_probs: list[float]  # same length, filled when the request asked for them
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "error" | None (context-only: KV held for a pull)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_block_ids: list[int] | None = None  # context-only: the blocks holding the prompt's KV
    error: Exception | None = None  # finish_reason "error": why this request (and only it) failed
    # with each token, when asked: its top_logprobs likeliest (token id, log-probability), likeliest first
    top_log_probs: list[list[tuple[int, float]]] = field(default_factory=list)
    # the first output of a request that asked for them: (log-probability, top alternatives) of each prompt
    # token from the second on
    prompt_log_probs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
