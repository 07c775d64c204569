"""One answer: from a validated request to the text, tokens, finish reason and usage it streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from openai_frontend.metrics import RequestTimer
from openai_frontend.schemas import SamplingRequest, Usage
from openai_frontend.text import AnswerText
from openai_frontend.triton_client import GenerationParams, TokenChunk, TritonGenerator
from python_backend_utils.triton_glue.tokenizer import TextTokenizer


def generation_params(request: SamplingRequest, output_limit: int | None, prompt_len: int, window: int,
                      log_probs: bool, top_logprobs: int = 0, prompt_log_probs: bool = False) -> GenerationParams:
    max_tokens = output_limit if output_limit is not None else max(1, window - prompt_len)
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(0, request.top_k),
        seed=request.seed,
        # ignore_eos: the end id is held back for the whole answer, so it runs to max_tokens
        min_tokens=max_tokens if request.ignore_eos else request.min_tokens,
        return_log_probs=log_probs,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        min_p=request.min_p,
        logit_bias=tuple(sorted((request.logit_bias or {}).items())),
        top_logprobs=top_logprobs,
        prompt_log_probs=prompt_log_probs,
    )


@dataclass
class Piece:
    """What one engine response adds to the answer."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    top_log_probs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked


class Answer:
    """The streamed answer to one request. `start()` waits for the first tokens, so a request the
    engine refuses fails before any response is sent; `pieces()` yields the rest."""

    def __init__(self, generator: TritonGenerator, tokenizer: TextTokenizer, prompt_ids: list[int],
                 params: GenerationParams, stops: list[str], timer: RequestTimer,
                 skip_special_tokens: bool = True) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self._timer = timer
        self.text = AnswerText(tokenizer, prompt_ids, stops, skip_special_tokens)
        self._chunks = generator.generate(prompt_ids, params)
        self._first: TokenChunk | None = None

    async def start(self) -> None:
        self._timer.dispatched(len(self.prompt_ids))
        try:
            self._first = await anext(self._chunks)
            self._timer.chunk(len(self._first.token_ids))
        except StopAsyncIteration:
            self._first = None
        except BaseException:
            self._timer.ended(None)
            await self._chunks.aclose()
            raise

    async def pieces(self) -> AsyncIterator[Piece]:
        complete = False
        try:
            chunk = self._first
            while chunk is not None and not self.text.stopped:
                yield Piece(self.text.add(chunk.token_ids), chunk.token_ids, chunk.log_probs, chunk.top_log_probs)
                chunk = await anext(self._chunks, None) if not self.text.stopped else None
                if chunk is not None:
                    self._timer.chunk(len(chunk.token_ids))
            complete = True
        finally:
            await self._chunks.aclose()  # after a stop string: cancels the rest of the generation
            self._timer.ended(self.finish_reason if complete else None)
        if tail := self.text.finish():
            yield Piece(tail)

    @property
    def prompt_log_probs(self) -> list[tuple[float, list[tuple[int, float]]]]:
        """The prompt's tokens' from the second on, when asked for."""
        return self._first.prompt_log_probs if self._first is not None else []

    async def close(self) -> None:
        """Stop the generation (a request that will not be read)."""
        await self._chunks.aclose()

    @property
    def finish_reason(self) -> str:
        if not self.text.stopped and self.text.token_count >= self.params.max_tokens:
            return "length"
        return "stop"

    @property
    def usage(self) -> Usage:
        prompt, completion = len(self.prompt_ids), self.text.token_count
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
