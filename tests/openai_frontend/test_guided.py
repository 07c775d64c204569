"""OpenAI's and vLLM's structured-output parameters, as the guide the engine compiles."""

from __future__ import annotations

import json

import pytest

from openai_frontend.guided import Guide, GuideError, requested_guide
from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("extra, guide", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, Guide("json")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     Guide("json_schema", json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA}, Guide("json_schema", json.dumps(SCHEMA))),
    ({"guided_regex": "[0-9]+"}, Guide("regex", "[0-9]+")),
    ({"guided_grammar": 'root ::= "a"'}, Guide("ebnf_grammar", 'root ::= "a"')),
    ({"structured_outputs": {"json": SCHEMA}}, Guide("json_schema", json.dumps(SCHEMA))),
    ({"structured_outputs": {"json_object": True}}, Guide("json")),
    ({"structured_outputs": {"choice": ["x"]}}, Guide("ebnf_grammar", 'root ::= "x"')),
])
def test_each_way_of_asking_becomes_one_guide(extra, guide):
    assert requested_guide(ChatCompletionRequest(**CHAT, **extra)) == guide


def test_choices_become_escaped_string_literals():
    guide = requested_guide(CompletionRequest(model="m", prompt="x", guided_choice=['say "hi"', "café\n"]))
    assert guide == Guide("ebnf_grammar", 'root ::= "say \\"hi\\"" | "café\\n"')


def test_two_constraints_at_once_are_refused_naming_the_second():
    request = ChatCompletionRequest(**CHAT, response_format={"type": "json_object"}, guided_regex="a")
    with pytest.raises(GuideError, match="several output constraints") as caught:
        requested_guide(request)
    assert caught.value.param == "guided_regex"


def test_a_json_schema_format_needs_its_schema():
    with pytest.raises(ValueError, match="needs its json_schema"):
        ChatCompletionRequest(**CHAT, response_format={"type": "json_schema"})
