"""Tool calling through the OpenAI frontend on a real (disaggregated) tritonserver, with the SDK."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from python_backend_utils.environment import DEFAULT_MODEL_NAME
from tests.helpers import openai_frontend

pytestmark = pytest.mark.integration

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": PARAMETERS}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def frontend_url(triton_server, tmp_path_factory):
    with openai_frontend(triton_server, tmp_path_factory.mktemp("openai")) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(frontend_url):
    return openai.OpenAI(base_url=f"{frontend_url}/v1", api_key="unused", max_retries=0)


def streamed_call(chunks) -> tuple[str, str, str, str | None]:
    """(id, name, arguments, finish reason) from a streamed answer's tool-call deltas."""
    call_id = name = finish = None
    arguments = ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for piece in choice.delta.tool_calls or []:
            assert piece.index == 0
            call_id = piece.id or call_id
            name = piece.function.name or name
            arguments += piece.function.arguments or ""
    return call_id, name, arguments, finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_round_trip(client, stream):
    """The model calls the tool, the tool's answer goes back as a `tool` message, the model answers."""
    request = {"model": DEFAULT_MODEL_NAME, "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
               "max_tokens": 40, "temperature": 0}
    whole = client.chat.completions.create(**request)
    [call] = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
    if stream:
        call_id, name, arguments, finish = streamed_call(client.chat.completions.create(**request, stream=True))
        assert call_id.startswith("call_") and (name, arguments, finish) == (
            "get_weather", call.function.arguments, "tool_calls")
    followup = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=followup, tools=[WEATHER],
                                            max_tokens=24, temperature=0, stream=stream)
    if stream:
        content = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    else:
        content = answer.choices[0].message.content
    assert content and "<tool_call>" not in content


def test_required_tool_arguments_validate_in_every_seeded_run(frontend_url):
    async def one(client: openai.AsyncOpenAI, seed: int):
        return await client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, tools=[WEATHER],
                                                    tool_choice="required", max_tokens=48, temperature=1.0, seed=seed)

    async def all_runs():
        async with openai.AsyncOpenAI(base_url=f"{frontend_url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, seed) for seed in range(10)))

    for answer in asyncio.run(all_runs()):
        [call] = answer.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)


def test_a_named_tool_choice_calls_that_tool(client):
    answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, tools=[WEATHER], max_tokens=40,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0)
    [call] = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
