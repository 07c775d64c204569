"""A request as the engine tracks it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_backend_utils.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from python_backend_utils.engine.grammar import GrammarMatcher

# Generation-only: called with the block table once blocks are allocated; the future it returns
# is done once nothing writes those blocks any more: with a result when the KV is in place, with
# an exception when the pull failed (the prompt is then recomputed here, as when it raises).
StartPull = Callable[[list[int]], Future]


class RequestType(enum.Enum):
    """Which phases this instance runs for a request (TensorRT-LLM's request types)."""

    CONTEXT_AND_GENERATION = "context_and_generation"  # aggregated: prefill and decode here
    CONTEXT_ONLY = "context_only"  # prefill, first token, then hold the KV for a generation instance
    GENERATION_ONLY = "generation_only"  # KV arrives from a context instance, decode here


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no blocks yet
    AWAITING_KV = "awaiting_kv"  # generation-only: blocks allocated, KV being pulled
    RUNNING = "running"
    KV_HELD = "kv_held"  # context-only: done computing, blocks pinned until released
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids are prompt + generated; KV is computed for the first `num_computed` of them.

    Every step processes some of the not-yet-computed tokens; when a step reaches the last
    token, its logits give the next token. Prefill, chunked prefill, decode, recompute after
    preemption and the local fallback of a failed KV pull are all this one rule.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    request_type: RequestType = RequestType.CONTEXT_AND_GENERATION
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    block_hash_chain: list[int] = field(default_factory=list)
    seed: int = 0  # sampled requests: their draws are seeded_uniforms(seed, output position)
    output_log_probs: list[float] = field(default_factory=list)
    output_top_log_probs: list[list[tuple[int, float]]] = field(default_factory=list)
    # params.prompt_log_probs: entry i for prompt token i + 1, as (log-probability, top alternatives)
    prompt_log_probs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    start_pull: StartPull | None = None
    kv_pull: Future | None = None  # what start_pull returned, polled between steps
    finish_reason: str | None = None
    num_emitted: int = 0
    grammar: GrammarMatcher | None = None  # structured output: where the answer is in its grammar

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
