"""The FastAPI application: routes, the OpenAI error body, JSON and SSE responses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from openai_frontend.chat_template import ChatTemplate, ChatTemplateError
from openai_frontend.generation import Answer, generation_params
from openai_frontend.guided import Guide, GuideError, requested_guide
from openai_frontend.metrics import CONTENT_TYPE, FrontendMetrics, RequestTimer
from openai_frontend.replies import ChatReply, CompletionReply, all_of
from openai_frontend.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    ModelList,
    SamplingRequest,
)
from openai_frontend.served_model import ServedModel
from openai_frontend.tools import ToolCalling, fallback_messages
from openai_frontend.triton_client import GenerationError, GenerationParams, TritonGenerator

logger = logging.getLogger(__name__)
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

    def guide_of(request: SamplingRequest) -> Guide | None:
        try:
            return requested_guide(request)
        except GuideError as error:
            raise ApiError(400, str(error), error.param) from None

    async def start(request: SamplingRequest, prompt_ids: list[int], output_limit: int | None,
                    log_probs: bool, top_logprobs: int, guide: Guide | None, timers: list[RequestTimer],
                    prompt_log_probs: bool = False) -> list[Answer]:
        """The request's n answers (one timer each), each started. The first one's prefill fills the
        prefix cache before the others are sent, so theirs reuse its KV blocks: the prompt is computed once."""
        await wait_ready()
        params = generation_params(request, output_limit, len(prompt_ids), model.context_window, log_probs,
                                   top_logprobs, prompt_log_probs)
        params = dataclasses.replace(params, guide=guide)
        answers = [Answer(generator, model.tokenizer, prompt_ids, choice_params(params, index),
                          request.stop_strings(), timer, request.skip_special_tokens)
                   for index, timer in enumerate(timers)]
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

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model.card])

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, http: Request) -> Completion | EventSourceResponse | Response:
        timers = [RequestTimer(metrics) for _ in range(request.n)]
        check(request)
        prompt_ids = model.tokenizer.encode(request.text_prompt()) if request.text_prompt() is not None \
            else list(request.prompt)
        answer = start(request, prompt_ids, request.output_limit(), request.logprobs is not None,
                       request.logprobs or 0, guide_of(request), timers,
                       prompt_log_probs=request.echo and request.logprobs is not None)
        if request.stream:
            return EventSourceResponse(sse(CompletionReply(await answer, request, model).chunks(),
                                           include_usage(request)))
        return await unless_disconnected(http, whole(lambda done: CompletionReply(done, request, model), answer))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest,
                               http: Request) -> ChatCompletion | EventSourceResponse | Response:
        timers = [RequestTimer(metrics) for _ in range(request.n)]
        check(request)
        if model.chat_template is None:
            raise ApiError(400, f"the model {model.card.id!r} has no chat template: use /v1/completions",
                           "messages", "no_chat_template")
        calling, guide = tool_calling(request), guide_of(request)
        if calling is not None and (forced := calling.guide()) is not None:
            if guide is not None:
                raise ApiError(400, f"tool_choice {request.tool_choice!r} forces a tool call: it cannot also follow "
                               "response_format or a guided_* constraint", "tool_choice")
            guide = forced
        prompt_ids = model.tokenizer.encode(render_chat(model.chat_template, request, calling),
                                            add_special_tokens=False)
        answer = start(request, prompt_ids, request.output_limit(), request.logprobs,
                       (request.top_logprobs or 0) if request.logprobs else 0, guide, timers)
        if request.stream:
            return EventSourceResponse(sse(ChatReply(await answer, request, model, calling).chunks(),
                                           include_usage(request)))
        return await unless_disconnected(http, whole(lambda done: ChatReply(done, request, model, calling), answer))

    return app


def tool_calling(request: ChatCompletionRequest) -> ToolCalling | None:
    try:
        return ToolCalling.of(request)
    except GuideError as error:
        raise ApiError(400, str(error), error.param) from None


def render_chat(template: ChatTemplate, request: ChatCompletionRequest, calling: ToolCalling | None) -> str:
    """The prompt's text; tools go to a template that renders them, else through the fallback (tools.py)."""
    messages = [message.template_data() for message in request.messages]
    try:
        if template.supports_tools:
            return template.render(messages, calling.template_tools() if calling else None)
        return template.render(fallback_messages(messages, calling))
    except ChatTemplateError as error:
        raise ApiError(400, str(error), "messages") from None


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
