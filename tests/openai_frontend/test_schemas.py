"""Request validation: what the engine cannot do is refused by name, never dropped."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
])
def test_chat_parameters_the_engine_cannot_honour_are_named(extra, param):
    assert ChatCompletionRequest(**CHAT, **extra).unsupported()[0] == param


def test_sampling_parameters_the_engine_honours_are_accepted():
    request = ChatCompletionRequest(**CHAT, n=3, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                                    logit_bias={"42": 5}, min_p=0.1, top_logprobs=20, logprobs=True)
    assert request.unsupported() is None and request.logit_bias == {42: 5.0}


@pytest.mark.parametrize("extra", [{"n": 0}, {"presence_penalty": 2.5}, {"logit_bias": {"the": 1}}, {"min_p": 2},
                                   {"top_logprobs": 21, "logprobs": True}, {"repetition_penalty": 0}])
def test_out_of_range_sampling_parameters_are_refused(extra):
    with pytest.raises(ValidationError, match=next(iter(extra))):
        ChatCompletionRequest(**CHAT, **extra)


def test_neutral_values_of_those_parameters_are_accepted():
    request = ChatCompletionRequest(**CHAT, n=1, presence_penalty=0, repetition_penalty=1, tools=[],
                                    response_format={"type": "text"}, top_logprobs=0, logprobs=True, user="u")
    assert request.unsupported() is None


@pytest.mark.parametrize("extra, param", [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
])
def test_completion_parameters_the_engine_cannot_honour_are_named(extra, param):
    assert CompletionRequest(**{"model": "m", "prompt": "x", **extra}).unsupported()[0] == param


def test_unknown_parameters_are_refused():
    with pytest.raises(ValidationError, match="best_of_n"):
        ChatCompletionRequest(**CHAT, best_of_n=2)


def test_max_completion_tokens_wins_over_max_tokens_and_stop_may_be_one_string():
    request = ChatCompletionRequest(**CHAT, max_tokens=5, max_completion_tokens=7, stop="\n")
    assert request.output_limit() == 7 and request.stop_strings() == ["\n"]


def test_a_prompt_is_text_a_list_of_one_text_or_token_ids():
    assert CompletionRequest(model="m", prompt="The capital").text_prompt() == "The capital"
    assert CompletionRequest(model="m", prompt=["The capital"]).text_prompt() == "The capital"
    assert CompletionRequest(model="m", prompt=[1, 2]).text_prompt() is None


def test_completions_default_to_sixteen_tokens_as_openai_and_vllm_do():
    assert CompletionRequest(model="m", prompt="x").output_limit() == 16
    assert CompletionRequest(model="m", prompt="x", max_tokens=None).output_limit() is None
    assert ChatCompletionRequest(**CHAT).output_limit() is None


# What OpenAI's API takes that cannot change an answer here: accepted and ignored.
IGNORED = {"store": True, "metadata": {"k": "v"}, "service_tier": "auto", "user": "u", "safety_identifier": "s",
           "parallel_tool_calls": False, "prompt_cache_key": "k", "prompt_cache_retention": "24h",
           "prompt_cache_options": {"mode": "implicit"}, "prediction": {"type": "content", "content": "x"},
           "modalities": ["text"], "stream_options": {"include_usage": True, "include_obfuscation": False}}


def test_parameters_that_cannot_change_the_answer_are_accepted():
    assert ChatCompletionRequest(**CHAT, **IGNORED).unsupported() is None
    assert CompletionRequest(model="m", prompt="x", user="u", stream_options={"include_usage": True}).unsupported() \
        is None


@pytest.mark.parametrize("extra, param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
])
def test_openai_features_this_server_cannot_honour_are_named(extra, param):
    assert ChatCompletionRequest(**CHAT, **extra).unsupported()[0] == param


def test_content_parts_of_text_are_joined_and_media_parts_are_refused_by_position():
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "this?", "prompt_cache_breakpoint": {}}]
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}])
    assert request.unsupported() is None
    assert request.messages[0].template_data() == {"role": "user", "content": "What is\nthis?"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    request = ChatCompletionRequest(model="m", messages=[*CHAT["messages"], {"role": "user", "content": [
        parts[0], image]}])
    param, reason = request.unsupported()
    assert param == "messages.1.content.1" and "image_url" in reason


# The request parameters of OpenAI's chat-completions and completions APIs (the openai SDK 3.63's
# CompletionCreateParams), vLLM's extensions beside them.
OPENAI_CHAT_PARAMS = {
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs", "max_completion_tokens",
    "max_tokens", "messages", "metadata", "modalities", "model", "moderation", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options"}
OPENAI_COMPLETION_PARAMS = {
    "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model", "n", "presence_penalty",
    "prompt", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user"}


def test_every_parameter_of_openais_apis_is_known():
    assert OPENAI_CHAT_PARAMS - set(ChatCompletionRequest.model_fields) == set()
    assert OPENAI_COMPLETION_PARAMS - set(CompletionRequest.model_fields) == set()
