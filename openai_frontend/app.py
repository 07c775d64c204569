"""The FastAPI application: routes, the OpenAI error body, JSON and SSE responses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from openai_frontend.chat_template import ChatTemplate, ChatTemplateError
from openai_frontend.generation import Answer, Piece, context_window, generation_params
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
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
    now,
    response_id,
)
from openai_frontend.triton_client import GenerationError, GenerationParams, TritonGenerator
from python_backend_utils.serving.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)
OWNER = "triton-disagg"
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it: nobody reads it, the access log shows it
T = TypeVar("T")
LogprobEntry = tuple[str, float | None, dict[str, float] | None]  # completions: token, log-probability, top


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=ERROR_TYPES.get(self.status, "server_error"),
                                           param=self.param, code=self.code))


@dataclass
class ServedModel:
    """The checkpoint the server runs, as the frontend needs it."""

    card: ModelCard
    tokenizer: TextTokenizer
    chat_template: ChatTemplate | None
    context_window: int

    @classmethod
    def load(cls, model_dir: Path) -> ServedModel:
        card = ModelCard(id=model_dir.name, created=int((model_dir / "config.json").stat().st_mtime), owned_by=OWNER)
        return cls(card, load_tokenizer({"model_dir": str(model_dir)}), ChatTemplate.from_checkpoint(model_dir),
                   context_window(model_dir))


def create_app(model: ServedModel, generator: TritonGenerator) -> FastAPI:
    ready_once = False

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        generator.open()
        yield
        await generator.close()

    app = FastAPI(title="triton-disagg OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body().model_dump(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return await api_error(request, ApiError(400, message, param, first.get("type")))

    @app.exception_handler(GenerationError)
    async def generation_failed(request: Request, error: GenerationError) -> JSONResponse:
        return await api_error(request, ApiError(error.status, str(error)))

    def check(request: SamplingRequest) -> None:
        if request.model != model.card.id:
            raise ApiError(404, f"the model {request.model!r} does not exist: this server serves {model.card.id!r}",
                           "model", "model_not_found")
        if (unsupported := request.unsupported()) is not None:
            raise ApiError(400, f"{unsupported[0]}: {unsupported[1]}", unsupported[0], "unsupported_parameter")

    async def wait_ready() -> None:
        nonlocal ready_once
        if not ready_once:  # once ready, a server that goes away shows in the request's own error
            ready_once = await generator.ready()
            if not ready_once:
                raise ApiError(503, "the model is not ready yet: retry shortly")

    async def start(request: SamplingRequest, prompt_ids: list[int], output_limit: int | None,
                    log_probs: bool, top_logprobs: int, prompt_log_probs: bool = False) -> list[Answer]:
        """The request's n answers, each started. The first one's prefill fills the prefix cache
        before the others are sent, so theirs reuse its KV blocks: the prompt is computed once."""
        await wait_ready()
        params = generation_params(request, output_limit, len(prompt_ids), model.context_window, log_probs,
                                   top_logprobs, prompt_log_probs)
        answers = [Answer(generator, model.tokenizer, prompt_ids, choice_params(params, index),
                          request.stop_strings(), request.skip_special_tokens) for index in range(request.n)]
        try:
            await answers[0].start()
            await all_of([answer.start() for answer in answers[1:]])
        except BaseException:
            await all_of([answer.close() for answer in answers])
            raise
        return answers

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await generator.ready()
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model.card])

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, http: Request) -> Completion | EventSourceResponse | Response:
        check(request)
        prompt_ids = model.tokenizer.encode(request.text_prompt()) if request.text_prompt() is not None \
            else list(request.prompt)
        answer = start(request, prompt_ids, request.output_limit(), request.logprobs is not None,
                       request.logprobs or 0, prompt_log_probs=request.echo and request.logprobs is not None)
        if request.stream:
            return EventSourceResponse(sse(CompletionReply(await answer, request, model).chunks(),
                                           include_usage(request)))
        return await unless_disconnected(http, whole(lambda done: CompletionReply(done, request, model), answer))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest,
                               http: Request) -> ChatCompletion | EventSourceResponse | Response:
        check(request)
        if model.chat_template is None:
            raise ApiError(400, f"the model {model.card.id!r} has no chat template: use /v1/completions",
                           "messages", "no_chat_template")
        try:
            rendered = model.chat_template.render([message.template_data() for message in request.messages])
        except ChatTemplateError as error:
            raise ApiError(400, str(error), "messages") from None
        # As transformers tokenizes a rendered chat: the template places any special tokens itself.
        prompt_ids = model.tokenizer.encode(rendered, add_special_tokens=False)
        answer = start(request, prompt_ids, request.output_limit(), request.logprobs,
                       (request.top_logprobs or 0) if request.logprobs else 0)
        if request.stream:
            return EventSourceResponse(sse(ChatReply(await answer, request, model).chunks(), include_usage(request)))
        return await unless_disconnected(http, whole(lambda done: ChatReply(done, request, model), answer))

    return app


async def whole(reply: Callable[[list[Answer]], CompletionReply | ChatReply],
                answer: Coroutine[None, None, list[Answer]]) -> Completion | ChatCompletion:
    """The non-streaming reply, from the request's start: a client may leave while it waits for its prefill."""
    return await reply(await answer).whole()


async def unless_disconnected(http: Request, answer: Coroutine[None, None, T]) -> T | Response:
    """A whole (non-streaming) answer, given up if the client disconnects first: cancelling it ends
    its generation, which frees its KV. Uvicorn tells an endpoint of a disconnect only when it
    sends, and a whole answer sends nothing until it is done."""
    answering = asyncio.ensure_future(answer)
    leaving = asyncio.ensure_future(disconnected(http))
    await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    if answering.done():
        leaving.cancel()
        return answering.result()
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering
    logger.info("the client disconnected before its answer was complete: its generation was cancelled")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def disconnected(http: Request) -> None:
    """Returns once the client has gone: the body is read, so the next ASGI message is the disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def include_usage(request: SamplingRequest) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


async def sse(chunks: AsyncIterator, usage: bool) -> AsyncIterator[bytes]:
    """The chunks as server-sent events, the usage chunk if asked for, then [DONE]. An error after
    the stream began can only be reported in it: an error body as one more event."""
    try:
        async for chunk in chunks:
            if chunk.usage is None or usage:
                yield format_sse_event(data_str=chunk.model_dump_json())
    except GenerationError as error:
        body = ApiError(error.status, str(error)).body()
        yield format_sse_event(data_str=body.model_dump_json())
    yield format_sse_event(data_str="[DONE]")


def choice_params(params: GenerationParams, index: int) -> GenerationParams:
    """Choice `index`'s settings: a seeded request's choices draw with seeds of their own."""
    return params if params.seed is None else dataclasses.replace(params, seed=params.seed + index)


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
    def __init__(self, answers: list[Answer], request: ChatCompletionRequest, model: ServedModel) -> None:
        self.answers, self.request, self.model = answers, request, model
        self.id, self.created = response_id("chatcmpl"), now()

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
        choices = [ChatChoice(index=index, message=AssistantMessage(content=answer.text.text),
                              logprobs=self._logprobs(answer, own), finish_reason=answer.finish_reason)
                   for index, (answer, own) in enumerate(zip(self.answers, pieces))]
        return ChatCompletion(id=self.id, created=self.created, model=self.model.card.id, choices=choices,
                              usage=total_usage(self.answers))

    async def chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in merged([self._choice_chunks(index, answer) for index, answer in enumerate(self.answers)]):
            yield chunk
        yield self._chunk([], total_usage(self.answers))

    async def _choice_chunks(self, index: int, answer: Answer) -> AsyncIterator[ChatCompletionChunk]:
        yield self._chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        async for piece in answer.pieces():
            if piece.text or piece.token_ids:
                yield self._chunk([ChatChunkChoice(index=index, delta=Delta(content=piece.text),
                                                   logprobs=self._logprobs(answer, [piece]))])
        yield self._chunk([ChatChunkChoice(index=index, delta=Delta(), finish_reason=answer.finish_reason)])
