"""Request and response bodies of the OpenAI API, as far as this server implements it.

Requests forbid unknown fields: a parameter this server does not know is a 400 naming it, never
silently dropped. Parameters it knows but the engine cannot honour (tools, suffix, ...)
are accepted by the schema and refused by `unsupported()` with a message that says why.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "tool_calls"]
MAX_CHOICES = 16  # n: each choice is a sequence of its own in the engine's batch


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(RequestBody):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels over OpenAI's network: ignored


class StructuredOutputs(RequestBody):
    """vLLM's `structured_outputs`: one constraint on the answer."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class SamplingRequest(RequestBody):
    """What /v1/completions and /v1/chat/completions share, with the extensions benchmark tools send."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 turn it off
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's extension
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's extension
    skip_special_tokens: bool = True  # vLLM's extension: False keeps special tokens' text in the answer
    # Structured output, vLLM's names (openai_frontend/guided.py)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, reason) for the first thing asked that the engine cannot do, else None."""
        return None


class TextPart(RequestBody):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a hint to OpenAI's prompt cache: ours is automatic


class MediaPart(BaseModel):
    """An image, audio or file part: known, so that it is refused by name (the model reads text only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


class FunctionCall(RequestBody):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(RequestBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | MediaPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required, except in an assistant message with tool_calls")
        return self

    def media_part(self) -> tuple[int, str] | None:
        """(index, type) of the first content part that is not text."""
        parts = self.content if isinstance(self.content, list) else []
        return next(((index, part.type) for index, part in enumerate(parts) if isinstance(part, MediaPart)), None)

    def template_data(self) -> dict[str, Any]:
        """The message as the chat template reads it: text parts joined into one string; tool calls
        with their arguments as objects, which is what templates that render them expect."""
        content = self.content if isinstance(self.content, str | None) else "\n".join(p.text for p in self.content)
        data: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            data["name"] = self.name
        if self.tool_calls:
            data["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        return data


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none means no arguments
    strict: bool | None = None  # calls forced by tool_choice follow the schema whatever this says


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(RequestBody):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response format needs its json_schema")
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's parameters that cannot change the answer here: accepted, and ignored.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    prediction: dict[str, Any] | None = None  # predicted output: a latency hint, the answer is the same
    # OpenAI's parameters this server cannot honour (a 400 names them), or only in their neutral value.
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def first_media_part(self) -> tuple[str, str] | None:
        """(parameter, type) of the first content part that is not text."""
        for index, message in enumerate(self.messages):
            if (found := message.media_part()) is not None:
                return f"messages.{index}.content.{found[0]}", found[1]
        return None

    def unsupported_openai_features(self) -> tuple[str, str] | None:
        """(parameter, reason) for the first of OpenAI's features this server cannot honour, else None."""
        if (media := self.first_media_part()) is not None:
            return media[0], f"{media[1]} content is not supported: the model reads text only"
        checks = [
            ("modalities", self.modalities not in (None, ["text"]), "the model answers in text only"),
            ("audio", self.audio is not None, "the model answers in text only"),
            ("reasoning_effort", self.reasoning_effort is not None, "the model has no reasoning effort to set"),
            ("verbosity", self.verbosity is not None, "the model has no verbosity to set: ask in the prompt"),
            ("web_search_options", self.web_search_options is not None, "this server does not search the web"),
            ("moderation", self.moderation is not None, "this server runs no moderation model"),
        ]
        return next(((name, reason) for name, failed, reason in checks if failed), None)

    def unsupported(self) -> tuple[str, str] | None:
        if (found := self.unsupported_openai_features()) is not None:
            return found
        checks = [
            ("tool_choice", self.tool_choice not in (None, "none") and not self.tools,
             "tool_choice needs tools to choose from"),
            ("functions", bool(self.functions), "function calls are not supported"),
            ("function_call", self.function_call not in (None, "none"), "function calls are not supported"),
            ("top_logprobs", bool(self.top_logprobs) and not self.logprobs,
             "top_logprobs needs logprobs set to true"),
        ]
        found = next(((name, reason) for name, failed, reason in checks if failed), None)
        return found or super().unsupported()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's and vLLM's default; null: up to the context window
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's limit is 5, vLLM's 20
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def output_limit(self) -> int | None:
        return self.max_tokens

    def text_prompt(self) -> str | None:
        """The prompt's text; None when it came as token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if self.prompt and isinstance(self.prompt[0], str) else None

    def unsupported(self) -> tuple[str, str] | None:
        checks = [
            ("prompt", isinstance(self.prompt, list) and bool(self.prompt) and isinstance(self.prompt[0], str)
             and len(self.prompt) != 1, "one prompt per request: batches of prompts are not supported"),
            ("best_of", self.best_of not in (None, 1), "only best_of=1 is supported"),
            ("suffix", bool(self.suffix), "suffixes (insertion) are not supported"),
        ]
        found = next(((name, reason) for name, failed, reason in checks if failed), None)
        return found or super().unsupported()


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: its first has id, type and name; the rest add to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
