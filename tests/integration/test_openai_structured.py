"""Structured output through the OpenAI frontend on a real tritonserver, disaggregated (the first
token sampled on a context instance, the rest on a generation instance) and aggregated."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from python_backend_utils.environment import DEFAULT_MODEL_NAME
from tests.helpers import openai_frontend

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Give the city, population and whether it is a capital, for Paris, as JSON."}]
RUNS = 10


@pytest.fixture(scope="module", params=["disaggregated_serving_bls", "aggregated"])
def frontend_url(request, triton_server, tmp_path_factory):
    with openai_frontend(triton_server, tmp_path_factory.mktemp("openai"), request.param) as server:
        yield server.url


@pytest.fixture
def client(frontend_url):
    return openai.OpenAI(base_url=f"{frontend_url}/v1", api_key="unused", max_retries=0)


def test_json_schema_answers_validate_in_every_seeded_run(frontend_url):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}

    async def one(client: openai.AsyncOpenAI, seed: int):
        return await client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, max_tokens=64,
                                                    temperature=1.0, seed=seed, response_format=response_format)

    async def all_runs():
        async with openai.AsyncOpenAI(base_url=f"{frontend_url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, seed) for seed in range(RUNS)))

    answers = asyncio.run(all_runs())
    for answer in answers:
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    assert len({answer.choices[0].message.content for answer in answers}) > 1, "the seeds should differ"


def test_json_object_regex_and_choice_constrain_the_answer(client):
    def content(**extra) -> str:
        """A complete answer: cut by max_tokens, a grammar's output need not parse."""
        answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, max_tokens=256,
                                                temperature=1.0, seed=3, **extra)
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        return answer.choices[0].message.content

    assert isinstance(json.loads(content(response_format={"type": "json_object"})), dict)
    assert content(extra_body={"guided_choice": ["yes", "no"]}) in ("yes", "no")
    assert content(extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})[3] == "-"
    streamed = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The answer:", max_tokens=16,
                                         temperature=1.0, seed=3, stream=True, extra_body={"guided_regex": "[A-Z]{4}"})
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    assert len(text) == 4 and text.isupper()


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": 3}}}}, None),
    ({"extra_body": {"guided_regex": "a(b"}}, None),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex"),
])
def test_an_invalid_or_doubled_constraint_is_a_400_and_the_server_keeps_serving(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, max_tokens=8, **extra)
    if param is not None:
        assert caught.value.body["param"] == param
    assert client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=ASK, max_tokens=2).choices
