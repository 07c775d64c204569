"""The answers' replies in OpenAI's shapes: whole or as a stream of chunks, one choice per answer (n)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import TypeVar

from openai_frontend.generation import Answer, Piece
from openai_frontend.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    now,
    response_id,
)
from openai_frontend.served_model import ServedModel
from openai_frontend.tools import ToolCalling, ToolCallParser

T = TypeVar("T")
LogprobEntry = tuple[str, float | None, dict[str, float] | None]  # completions: token, log-probability, top


async def all_of(coroutines: list[Coroutine[None, None, T]]) -> list[T]:
    """Their results; when one fails (or this is cancelled), the others are cancelled too."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several streams as they come; closing this closes them all."""
    pending = {asyncio.ensure_future(anext(stream)): stream for stream in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                stream = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(stream))] = stream
                yield item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def collected(answer: Answer) -> list[Piece]:
    return [piece async for piece in answer.pieces()]


def total_usage(answers: list[Answer]) -> Usage:
    """The prompt counted once (its KV is shared), every choice's completion tokens."""
    prompt = answers[0].usage.prompt_tokens
    completion = sum(answer.usage.completion_tokens for answer in answers)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionReply:
    def __init__(self, answers: list[Answer], request: CompletionRequest, model: ServedModel) -> None:
        self.answers, self.request, self.model = answers, request, model
        self.id, self.created = response_id("cmpl"), now()

    def _logprobs(self, entries: list[LogprobEntry]) -> CompletionLogprobs | None:
        """OpenAI's completions shape: per token its text, log-probability, offset and a dict of the
        `logprobs` likeliest tokens (plus the chosen one); null for an echoed prompt's first token."""
        if self.request.logprobs is None:
            return None
        offsets, at = [], 0
        for token, _, _ in entries:
            offsets.append(at)
            at += len(token)
        return CompletionLogprobs(tokens=[token for token, _, _ in entries],
                                  token_logprobs=[log_prob for _, log_prob, _ in entries],
                                  top_logprobs=[top for _, _, top in entries], text_offset=offsets)

    @staticmethod
    def _entry(answer: Answer, token_id: int, log_prob: float, top: list[tuple[int, float]]) -> LogprobEntry:
        text = answer.text.token_text
        token = text(token_id)
        return token, log_prob, {**{text(t): lp for t, lp in top}, token: log_prob}

    def _entries(self, answer: Answer, pieces: list[Piece]) -> list[LogprobEntry]:
        return [self._entry(answer, token_id, log_prob, top) for piece in pieces
                for token_id, log_prob, top in zip(piece.token_ids, piece.log_probs,
                                                   piece.top_log_probs or [[]] * len(piece.token_ids))]

    def _echo(self, answer: Answer) -> tuple[str, list[LogprobEntry]]:
        """echo: the prompt's text, and its tokens' log-probability entries when logprobs are asked for."""
        if not self.request.echo:
            return "", []
        prompt = self.request.text_prompt()
        text = prompt if prompt is not None else self.model.tokenizer.decode(answer.prompt_ids)
        first = answer.prompt_ids[0]
        entries = [(answer.text.token_text(first), None, None)] + [
            self._entry(answer, token_id, log_prob, top)
            for token_id, (log_prob, top) in zip(answer.prompt_ids[1:], answer.prompt_log_probs)]
        return text, entries

    def _completion(self, choices: list[CompletionChoice], usage=None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model.card.id, choices=choices, usage=usage)

    async def whole(self) -> Completion:
        pieces = await all_of([collected(answer) for answer in self.answers])
        choices = []
        for index, (answer, own) in enumerate(zip(self.answers, pieces)):
            echo, echo_entries = self._echo(answer)
            choices.append(CompletionChoice(index=index, text=echo + answer.text.text,
                                            logprobs=self._logprobs(echo_entries + self._entries(answer, own)),
                                            finish_reason=answer.finish_reason))
        return self._completion(choices, total_usage(self.answers))

    async def chunks(self) -> AsyncIterator[Completion]:
        async for chunk in merged([self._choice_chunks(index, answer) for index, answer in enumerate(self.answers)]):
            yield chunk
        yield self._completion([], total_usage(self.answers))

    async def _choice_chunks(self, index: int, answer: Answer) -> AsyncIterator[Completion]:
        if self.request.echo:
            echo, echo_entries = self._echo(answer)
            yield self._completion([CompletionChoice(index=index, text=echo, logprobs=self._logprobs(echo_entries))])
        async for piece in answer.pieces():
            if piece.text or piece.token_ids:
                yield self._completion([CompletionChoice(index=index, text=piece.text,
                                                         logprobs=self._logprobs(self._entries(answer, [piece])))])
        yield self._completion([CompletionChoice(index=index, text="", finish_reason=answer.finish_reason)])


class ChatReply:
    def __init__(self, answers: list[Answer], request: ChatCompletionRequest, model: ServedModel,
                 calling: ToolCalling | None = None) -> None:
        self.answers, self.request, self.model = answers, request, model
        # each choice's calls are parsed from its own text
        self.parsers = [ToolCallParser(calling) if calling is not None else None for _ in answers]
        self.id, self.created = response_id("chatcmpl"), now()

    def _finish_reason(self, index: int) -> str:
        parser, answer = self.parsers[index], self.answers[index]
        if parser is not None and parser.calls and answer.finish_reason == "stop":
            return "tool_calls"
        return answer.finish_reason

    def _logprobs(self, answer: Answer, pieces: list[Piece]) -> ChoiceLogprobs | None:
        if not self.request.logprobs:
            return None
        entries = []
        for piece in pieces:
            tops = piece.top_log_probs or [[]] * len(piece.token_ids)
            for token_id, log_prob, top in zip(piece.token_ids, piece.log_probs, tops):
                token = answer.text.token_text(token_id)
                alternatives = [TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))
                                for text, lp in ((answer.text.token_text(t), lp) for t, lp in top)]
                entries.append(TokenLogprob(token=token, logprob=log_prob, bytes=list(token.encode()),
                                            top_logprobs=alternatives))
        return ChoiceLogprobs(content=entries)

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model.card.id, choices=choices,
                                   usage=usage)

    async def whole(self) -> ChatCompletion:
        pieces = await all_of([collected(answer) for answer in self.answers])
        choices = []
        for index, (answer, own, parser) in enumerate(zip(self.answers, pieces, self.parsers)):
            content, calls = answer.text.text, None
            if parser is not None:
                content, calls = parser.parse(content)
            choices.append(ChatChoice(index=index, message=AssistantMessage(content=content, tool_calls=calls or None),
                                      logprobs=self._logprobs(answer, own), finish_reason=self._finish_reason(index)))
        return ChatCompletion(id=self.id, created=self.created, model=self.model.card.id, choices=choices,
                              usage=total_usage(self.answers))

    async def chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in merged([self._choice_chunks(index, answer) for index, answer in enumerate(self.answers)]):
            yield chunk
        yield self._chunk([], total_usage(self.answers))

    async def _choice_chunks(self, index: int, answer: Answer) -> AsyncIterator[ChatCompletionChunk]:
        parser = self.parsers[index]
        yield self._chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        async for piece in answer.pieces():
            if not (piece.text or piece.token_ids):
                continue
            delta = Delta(content=piece.text) if parser is None else parser.feed(piece.text)
            if delta is not None or self.request.logprobs:
                yield self._chunk([ChatChunkChoice(index=index, delta=delta or Delta(),
                                                   logprobs=self._logprobs(answer, [piece]))])
        if parser is not None and (delta := parser.finish()) is not None:
            yield self._chunk([ChatChunkChoice(index=index, delta=delta)])
        yield self._chunk([ChatChunkChoice(index=index, delta=Delta(), finish_reason=self._finish_reason(index))])
