"""Tool calling in the frontend: parsing the model's calls (whole and streamed in any split), the
grammar that forces a call, and the prompt for templates with and without tool support."""

from __future__ import annotations

import json

import pytest

from openai_frontend.chat_template import ChatTemplate
from openai_frontend.guided import GuideError
from openai_frontend.schemas import ChatCompletionRequest
from openai_frontend.tools import ToolCalling, ToolCallParser, fallback_messages
from python_backend_utils.environment import default_model_dir

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def calling(tool_choice=None) -> ToolCalling:
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    return ToolCalling.of(ChatCompletionRequest(model="m", messages=USER, tools=[WEATHER, TIME], **extra))


def streamed(choice: ToolCalling, text: str, size: int) -> tuple[str, list[tuple[str, str]], list]:
    """Feed `text` in pieces of `size` characters; the content and (name, arguments) the deltas add up to."""
    parser = ToolCallParser(choice)
    deltas = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    deltas = [d for d in deltas if d is not None]
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        for piece in delta.tool_calls or []:
            if piece.id is not None:
                calls[piece.index] = [piece.function.name, ""]
            calls[piece.index][1] += piece.function.arguments or ""
    return content, [tuple(call) for _, call in sorted(calls.items())], deltas


AUTO_CASES = [
    ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris"}')]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
     None, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    (' {"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", '{"city": "Oslo"}')]),
    ('{"name": "not_a_tool", "arguments": {}}', '{"name": "not_a_tool", "arguments": {}}', []),
    ("It is sunny in Paris <tool", "It is sunny in Paris <tool", []),
    ("<tool_call>{broken</tool_call> ok", "<tool_call>{broken</tool_call> ok", []),
]


@pytest.mark.parametrize("text, content, calls", AUTO_CASES)
def test_auto_calls_are_read_whole_and_in_every_split(text, content, calls):
    whole_content, whole_calls = ToolCallParser(calling()).parse(text)
    assert whole_content == content
    assert [(c.function.name, c.function.arguments) for c in whole_calls] == calls
    for size in range(1, len(text) + 1):
        streamed_content, streamed_calls, _ = streamed(calling(), text, size)
        assert streamed_calls == calls, size
        assert (streamed_content.strip() or None if calls else streamed_content) == content, size


def test_a_forced_call_streams_its_name_first_then_argument_fragments():
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    for size in (1, 3, 7, len(text)):
        content, calls, deltas = streamed(calling("required"), text, size)
        assert content == "" and calls == [("get_weather", '{"city": "Paris"}')]
        first = deltas[0].tool_calls[0]
        assert first.id.startswith("call_") and first.type == "function" and first.function.name == "get_weather"
        assert all(d.tool_calls[0].id is None and d.tool_calls[0].function.name is None for d in deltas[1:])
    _, [call] = ToolCallParser(calling("required")).parse(text)
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_named_choice_streams_the_arguments_it_generates():
    named = calling({"type": "function", "function": {"name": "get_weather"}})
    assert streamed(named, '{"city": "Rome"}', 2)[1] == [("get_weather", '{"city": "Rome"}')]
    content, [call] = ToolCallParser(named).parse('{"city": "Rome"}')
    assert content is None and (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Rome"}')


def test_the_grammar_forces_a_call_for_required_and_named_choices_only():
    assert calling().guide() is None
    named = json.loads(calling({"type": "function", "function": {"name": "get_weather"}}).guide().guide)
    assert named == WEATHER["function"]["parameters"]
    required = json.loads(calling("required").guide().guide)
    assert [option["properties"]["name"] for option in required["anyOf"]] == [{"const": "get_weather"},
                                                                              {"const": "get_time"}]
    assert required["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}


def test_tool_choice_none_offers_no_tools_and_an_unknown_name_is_refused():
    assert calling("none") is None
    with pytest.raises(GuideError, match="not among the tools"):
        calling({"type": "function", "function": {"name": "launch"}})


def test_the_fallback_puts_tools_in_the_system_prompt_and_calls_and_results_in_text():
    request = ChatCompletionRequest(model="m", tools=[WEATHER], messages=[
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ])
    messages = fallback_messages([m.template_data() for m in request.messages], ToolCalling.of(request))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert json.dumps(WEATHER["function"]) in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert messages[3]["content"] == "<tool_response>\n22 C, sunny\n</tool_response>"
    rendered = ChatTemplate.from_checkpoint(default_model_dir()).render(messages)
    assert "22 C, sunny" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_templates_that_render_tools_are_told_apart_from_those_that_ignore_them():
    assert not ChatTemplate.from_checkpoint(default_model_dir()).supports_tools
    template = ChatTemplate("{% for t in tools %}{{ t.function.name }};{% endfor %}{{ messages[0].content }}", {})
    assert template.supports_tools
    assert template.render(USER, [WEATHER]) == "get_weather;Weather in Paris?"


def test_content_may_be_null_only_in_an_assistant_message_with_tool_calls():
    with pytest.raises(ValueError, match="content is required"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": None}])
