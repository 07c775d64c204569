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
