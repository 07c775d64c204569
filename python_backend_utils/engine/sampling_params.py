"""Per-request sampling settings and their checks: torch-free, so the Triton glue and the
orchestrator can build and validate them without loading the engine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from python_backend_utils.errors import InvalidRequestError

# Temperatures below this are greedy: logits/T would overflow, and the draw is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024

# TensorRT-LLM's guided_decoding_guide_type values this engine compiles (engine/grammar.py):
# "json" any JSON object, "json_schema" a JSON schema, "regex", "ebnf_grammar" (xgrammar's EBNF).
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
MAX_GUIDE_BYTES = 1 << 20  # a grammar is compiled against the whole vocabulary: bound what that costs


@dataclass(frozen=True)
class GuidedDecoding:
    """A grammar the answer must follow (structured output), as text: it crosses Triton as a string."""

    guide_type: str
    guide: str = ""  # the schema, regex or grammar; unused for "json"

    def validate(self) -> None:
        if self.guide_type not in GUIDE_TYPES:
            raise InvalidRequestError(
                f"guided_decoding_guide_type {self.guide_type!r} is not one of {', '.join(GUIDE_TYPES)}")
        if self.guide_type != "json" and not self.guide:
            raise InvalidRequestError(f"guided_decoding_guide is empty: a {self.guide_type} guide needs its text")
        if len(self.guide.encode()) > MAX_GUIDE_BYTES:
            raise InvalidRequestError(f"guided_decoding_guide is longer than {MAX_GUIDE_BYTES} bytes")


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding. temperature 0 (the default; anything below
    GREEDY_TEMPERATURE) or top_k 1 means greedy."""

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
    min_tokens: int = 0  # the end id and stop words cannot end the answer before this many tokens
    guided_decoding: GuidedDecoding | None = None
    # OpenAI's penalties, over the generated tokens: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers'/vLLM's, over prompt and generated tokens: a seen token's logit is divided by it
    # when positive, multiplied by it when negative
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p times the most likely one
    top_logprobs: int = 0  # this many most likely tokens (and their log-probabilities) with each token
    prompt_log_probs: bool = False  # also the prompt's tokens' (from the second on), top_logprobs alternatives too

    @property
    def penalized(self) -> bool:
        """Whether the logits are changed before sampling (penalties or biases)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

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
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens (min_length) must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        self._validate_logit_processing(vocab_size)
        for value, name in ((self.end_id, "end_id"), (self.pad_id, "pad_id")):
            if value is not None and not 0 <= value < vocab_size:
                raise InvalidRequestError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
        for words, name in ((self.stop_words, "stop_words"), (self.bad_words, "bad_words")):
            for word in words:
                if not word:
                    raise InvalidRequestError(f"{name} holds an empty word (an empty string tokenizes to nothing)")
                check_token_ids(word, vocab_size, name)
        if self.guided_decoding is not None:
            self.guided_decoding.validate()


    def _validate_logit_processing(self, vocab_size: int) -> None:
        for value, name in ((self.presence_penalty, "presence_penalty"), (self.frequency_penalty, "frequency_penalty")):
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequestError(
                f"repetition_penalty must be a finite number > 0 (1 disables it), got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError(
                f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are accepted")
        check_token_ids([token for token, _ in self.logit_bias], vocab_size, "logit_bias")
        for token, bias in self.logit_bias:
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(
                    f"logit_bias for token {token} is {bias}: biases must be in [-100, 100]")


def check_token_ids(token_ids: Sequence[int], vocab_size: int, name: str) -> None:
    """Refuse ids the model has no embedding for: one would fail the whole batch it lands in."""
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) < vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidRequestError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
