"""One answer: from a validated request to the text, tokens, finish reason and usage it streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from openai_frontend.metrics import RequestTimer
from openai_frontend.schemas import SamplingRequest, Usage
from openai_frontend.text import AnswerText
from openai_frontend.triton_client import GenerationParams, TokenChunk, TritonGenerator
from python_backend_utils.serving.tokenizer import TextTokenizer

# The engine's default context window is the model's, capped here (engine/config.py DEFAULT_MAX_MODEL_LEN_CAP).
MAX_CONTEXT_WINDOW = 8192


def context_window(model_dir: Path) -> int:
    """The tokens a prompt and its answer may span: what a request without max_tokens may use."""
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    limits = [config.get("max_position_embeddings") or MAX_CONTEXT_WINDOW, config.get("sliding_window"),
              MAX_CONTEXT_WINDOW]
    return min(limit for limit in limits if limit)


def generation_params(request: SamplingRequest, output_limit: int | None, prompt_len: int, window: int,
                      log_probs: bool) -> GenerationParams:
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
    )


@dataclass
class Piece:
    """What one engine response adds to the answer."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)


class Answer:
    """The streamed answer to one request. `start()` waits for the first tokens, so a request the
    engine refuses fails before any response is sent; `pieces()` yields the rest."""

    def __init__(self, generator: TritonGenerator, tokenizer: TextTokenizer, prompt_ids: list[int],
                 params: GenerationParams, stops: list[str], timer: RequestTimer) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self._timer = timer
        self.text = AnswerText(tokenizer, prompt_ids, stops)
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
                yield Piece(self.text.add(chunk.token_ids), chunk.token_ids, chunk.log_probs)
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
    def finish_reason(self) -> str:
        if not self.text.stopped and self.text.token_count >= self.params.max_tokens:
            return "length"
        return "stop"

    @property
    def usage(self) -> Usage:
        prompt, completion = len(self.prompt_ids), self.text.token_count
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
