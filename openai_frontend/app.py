"""The FastAPI application: routes, the OpenAI error body, JSON and SSE responses."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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
from openai_frontend.generation import Answer, context_window, generation_params
from openai_frontend.metrics import CONTENT_TYPE, FrontendMetrics, RequestTimer
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
    now,
    response_id,
)
from openai_frontend.triton_client import GenerationError, TritonGenerator
from python_backend_utils.serving.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)
OWNER = "triton-disagg"
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               503: "service_unavailable"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it: nobody reads it, the access log shows it
T = TypeVar("T")


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
    def load(cls, model_dir: Path, served_name: str | None = None) -> ServedModel:
        """`served_name`: the `model` clients name (default: the checkpoint directory's name)."""
        card = ModelCard(id=served_name or model_dir.name, created=int((model_dir / "config.json").stat().st_mtime),
                         owned_by=OWNER)
        return cls(card, load_tokenizer({"model_dir": str(model_dir)}), ChatTemplate.from_checkpoint(model_dir),
                   context_window(model_dir))


def create_app(model: ServedModel, generator: TritonGenerator, api_key: str | None = None) -> FastAPI:
    """`api_key`: the Bearer token every /v1 request must carry (None: open to all). /health and
    /metrics stay open, as vLLM's do: probes and Prometheus carry no key."""
    ready_once = False
    metrics = FrontendMetrics(model.card.id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        generator.open()
        yield
        await generator.close()

    app = FastAPI(title="triton-disagg OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body().model_dump(), status_code=error.status)

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def authorized(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
                error = ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return JSONResponse(error.body().model_dump(), status_code=401)
            return await call_next(request)

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

    async def start(request: SamplingRequest, prompt_ids: list[int], output_limit: int | None, log_probs: bool,
                    timer: RequestTimer) -> Answer:
        await wait_ready()
        params = generation_params(request, output_limit, len(prompt_ids), model.context_window, log_probs)
        answer = Answer(generator, model.tokenizer, prompt_ids, params, request.stop_strings(), timer)
        await answer.start()
        return answer

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await generator.ready()
        return JSONResponse({"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model.card])

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, http: Request) -> Completion | EventSourceResponse | Response:
        timer = RequestTimer(metrics)
        check(request)
        prompt_ids = model.tokenizer.encode(request.text_prompt()) if request.text_prompt() is not None \
            else list(request.prompt)
        answer = start(request, prompt_ids, request.output_limit(), request.logprobs is not None, timer)
        if request.stream:
            return EventSourceResponse(sse(CompletionReply(await answer, request, model).chunks(),
                                           include_usage(request)))
        return await unless_disconnected(http, whole(lambda done: CompletionReply(done, request, model), answer))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest,
                               http: Request) -> ChatCompletion | EventSourceResponse | Response:
        timer = RequestTimer(metrics)
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
        answer = start(request, prompt_ids, request.output_limit(), request.logprobs, timer)
        if request.stream:
            return EventSourceResponse(sse(ChatReply(await answer, request, model).chunks(), include_usage(request)))
        return await unless_disconnected(http, whole(lambda done: ChatReply(done, request, model), answer))

    return app


async def whole(reply: Callable[[Answer], CompletionReply | ChatReply],
                answer: Coroutine[None, None, Answer]) -> Completion | ChatCompletion:
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


class CompletionReply:
    def __init__(self, answer: Answer, request: CompletionRequest, model: ServedModel) -> None:
        self.answer, self.request, self.model = answer, request, model
        self.id, self.created = response_id("cmpl"), now()

    def _logprobs(self, pieces) -> CompletionLogprobs | None:
        if self.request.logprobs is None:
            return None
        tokens = [self.answer.text.token_text(t) for piece in pieces for t in piece.token_ids]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[lp for p in pieces for lp in p.log_probs],
                                  text_offset=offsets)

    def _completion(self, choices: list[CompletionChoice], usage=None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model.card.id, choices=choices, usage=usage)

    async def whole(self) -> Completion:
        pieces = [piece async for piece in self.answer.pieces()]
        choice = CompletionChoice(text=self.answer.text.text, logprobs=self._logprobs(pieces),
                                  finish_reason=self.answer.finish_reason)
        return self._completion([choice], self.answer.usage)

    async def chunks(self) -> AsyncIterator[Completion]:
        async for piece in self.answer.pieces():
            if piece.text or piece.token_ids:
                yield self._completion([CompletionChoice(text=piece.text, logprobs=self._logprobs([piece]))])
        yield self._completion([CompletionChoice(text="", finish_reason=self.answer.finish_reason)])
        yield self._completion([], self.answer.usage)


class ChatReply:
    def __init__(self, answer: Answer, request: ChatCompletionRequest, model: ServedModel) -> None:
        self.answer, self.request, self.model = answer, request, model
        self.id, self.created = response_id("chatcmpl"), now()

    def _logprobs(self, pieces) -> ChoiceLogprobs | None:
        if not self.request.logprobs:
            return None
        entries = []
        for piece in pieces:
            for token_id, log_prob in zip(piece.token_ids, piece.log_probs):
                token = self.answer.text.token_text(token_id)
                entries.append(TokenLogprob(token=token, logprob=log_prob, bytes=list(token.encode())))
        return ChoiceLogprobs(content=entries)

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model.card.id, choices=choices,
                                   usage=usage)

    async def whole(self) -> ChatCompletion:
        pieces = [piece async for piece in self.answer.pieces()]
        choice = ChatChoice(message=AssistantMessage(content=self.answer.text.text), logprobs=self._logprobs(pieces),
                            finish_reason=self.answer.finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.model.card.id, choices=[choice],
                              usage=self.answer.usage)

    async def chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        yield self._chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))])
        async for piece in self.answer.pieces():
            if piece.text or piece.token_ids:
                yield self._chunk([ChatChunkChoice(delta=Delta(content=piece.text), logprobs=self._logprobs([piece]))])
        yield self._chunk([ChatChunkChoice(delta=Delta(), finish_reason=self.answer.finish_reason)])
        yield self._chunk([], self.answer.usage)
