"""Tool calling: the tools in the prompt, the grammar that forces a call, and the model's calls
parsed out of its answer, whole or as OpenAI streams them.

- `tool_choice` "auto" (the default with tools): the model answers freely; its calls are read in
  the two common formats, Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks anywhere in the answer, or an answer that is nothing but such a JSON object (Llama 3.1
  writes "parameters" for "arguments": both are read). "none": no tools are offered.
- "required" and a named function: the engine's grammar forces the answer to be
  `{"name": ..., "arguments": ...}` (one of the tools, its arguments valid for its schema), or
  the named function's arguments alone: the call is valid JSON for its schema by construction.
- A chat template that renders `tools` (Qwen, Llama 3.1, Hermes ...) gets them and the messages'
  tool calls as they are. One that ignores them (SmolLM2's) gets the fallback: the tools as JSON
  in a system prompt that asks for Hermes-style calls, earlier calls written out in that format,
  and each tool result as a user turn inside <tool_response> tags.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from openai_frontend.guided import Guide, GuideError
from openai_frontend.schemas import (
    ChatCompletionRequest,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    ResponseFunctionCall,
    ResponseToolCall,
    Tool,
)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_PROMPT = (
    "You may call functions to answer. Each is described by a JSON object on its own line:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with nothing but "
    '<tool_call>{{"name": "<the function\'s name>", "arguments": <the arguments as a JSON object>}}</tool_call>. '
    "Its result comes back inside <tool_response></tool_response>; then answer the user with it."
)
# How a forced call ("required") starts: the grammar writes JSON without free whitespace.
_FORCED_CALL_START = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')
NO_PARAMETERS = {"type": "object", "properties": {}}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCalling:
    """The tools a request offers and how the model may use them."""

    tools: list[Tool]
    choice: str  # "auto", "required" or "named"
    named: str | None = None

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> ToolCalling | None:
        """None when no tool is offered (no tools, or tool_choice "none"); GuideError for a named
        function that is not among the tools."""
        if not request.tools or request.tool_choice == "none":
            return None
        choice = request.tool_choice or "auto"
        if isinstance(choice, str):
            return cls(request.tools, choice)
        names = [tool.function.name for tool in request.tools]
        if choice.function.name not in names:
            raise GuideError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                             f"({', '.join(names)})", "tool_choice")
        return cls(request.tools, "named", choice.function.name)

    def guide(self) -> Guide | None:
        """The grammar that forces a call ("required", named); None for "auto"."""
        if self.choice == "named":
            [tool] = [tool for tool in self.tools if tool.function.name == self.named]
            return Guide.json_schema(tool.function.parameters or NO_PARAMETERS)
        if self.choice == "required":
            calls = [{"type": "object",
                      "properties": {"name": {"const": tool.function.name},
                                     "arguments": tool.function.parameters or NO_PARAMETERS},
                      "required": ["name", "arguments"], "additionalProperties": False}
                     for tool in self.tools]
            return Guide.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})
        return None

    def template_tools(self) -> list[dict[str, Any]]:
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


def fallback_messages(messages: list[dict[str, Any]], calling: ToolCalling | None) -> list[dict[str, Any]]:
    """The conversation for a chat template that knows nothing of tools (module docstring)."""
    converted = []
    for message in messages:
        if message["role"] == "tool":
            converted.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            calls = "".join(CALL_OPEN + json.dumps({"name": call["function"]["name"],
                                                    "arguments": call["function"]["arguments"]}, ensure_ascii=False)
                            + CALL_CLOSE for call in message["tool_calls"])
            converted.append({"role": message["role"], "content": (message["content"] or "") + calls})
        else:
            converted.append({key: value for key, value in message.items() if key != "tool_call_id"})
    if calling is None:
        return converted
    prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False)
                                                    for t in calling.template_tools()))
    if converted and converted[0]["role"] in ("system", "developer"):
        return [{**converted[0], "content": f"{converted[0]['content']}\n\n{prompt}"}, *converted[1:]]
    return [{"role": "system", "content": prompt}, *converted]


def _partial_tag_length(text: str, tag: str) -> int:
    """Characters at the end of `text` that begin `tag`: held back until the next text shows."""
    return max((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), default=0)


@dataclass
class ToolCallParser:
    """Reads the model's answer as it streams: feed() the new text, finish() once it ends; each
    returns the Delta to send (content, and/or pieces of calls), or None. Whole answers go through
    the same parser (parse())."""

    calling: ToolCalling
    calls: list[ResponseToolCall] = field(default_factory=list)
    _buffer: str = ""
    _state: str = "start"  # start, text, block (inside <tool_call>), json (an answer that is one object), forced
    _sent: int = 0  # forced calls: characters of _buffer already sent

    def feed(self, text: str) -> Delta | None:
        self._buffer += text
        if self.calling.choice == "named":
            return self._named(text)
        if self.calling.choice == "required":
            return self._forced(final=False)
        return self._auto(final=False)

    def finish(self) -> Delta | None:
        if self.calling.choice == "named":
            return None
        if self.calling.choice == "required":
            return self._forced(final=True)
        return self._auto(final=True)

    def parse(self, text: str) -> tuple[str | None, list[ResponseToolCall]]:
        """A whole answer: (its content, None when empty once the calls are taken out; its calls)."""
        content = "".join(delta.content or "" for delta in (self.feed(text), self.finish()) if delta is not None)
        return (content.strip() or None) if self.calls else content, self.calls

    # ------------------------------------------------------------ the three modes
    def _named(self, text: str) -> Delta:
        if not self.calls:
            self.calls.append(ResponseToolCall(id=call_id(), function=ResponseFunctionCall(name=self.calling.named,
                                                                                        arguments=text)))
            return self._call_delta(self.calls[0], first=True, arguments=text)
        self.calls[0].function.arguments += text
        return self._call_delta(self.calls[0], first=False, arguments=text)

    def _forced(self, final: bool) -> Delta | None:
        """`{"name": "f", "arguments": {...}}`: the name once it is complete, then the arguments as
        they come, less the object's closing brace."""
        if not self.calls:
            match = _FORCED_CALL_START.match(self._buffer)
            if match is None:
                return Delta(content=self._buffer) if final and self._buffer else None
            call = ResponseToolCall(id=call_id(), function=ResponseFunctionCall(name=json.loads(match.group(1)),
                                                                               arguments=""))
            self.calls.append(call)
            self._sent = match.end()
            return self._call_delta(call, first=True, arguments="")
        end = len(self._buffer.rstrip().removesuffix("}")) if final else len(self._buffer) - 1
        piece = self._buffer[self._sent:end]
        if not piece:
            return None
        self._sent = end
        self.calls[0].function.arguments += piece
        return self._call_delta(self.calls[0], first=False, arguments=piece)

    def _auto(self, final: bool) -> Delta | None:
        content, calls = "", []
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if not stripped and not final:
                    break
                self._state = "json" if stripped.startswith("{") else "text"
            elif self._state == "json":
                if not final:
                    break
                call = self._call_from(self._buffer, known_names_only=True)
                if call is None:
                    content += self._buffer
                else:
                    calls.append(call)
                self._buffer = ""
                break
            elif self._state == "text":
                at = self._buffer.find(CALL_OPEN)
                if at < 0:
                    end = len(self._buffer) - (0 if final else _partial_tag_length(self._buffer, CALL_OPEN))
                    content, self._buffer = content + self._buffer[:end], self._buffer[end:]
                    break
                content += self._buffer[:at]
                self._buffer = self._buffer[at + len(CALL_OPEN):]
                self._state = "block"
            else:  # block
                at = self._buffer.find(CALL_CLOSE)
                if at < 0 and not final:
                    break
                block = self._buffer if at < 0 else self._buffer[:at]
                call = self._call_from(block, known_names_only=False)
                if call is None:
                    content += CALL_OPEN + block + ("" if at < 0 else CALL_CLOSE)
                else:
                    calls.append(call)
                self._buffer = "" if at < 0 else self._buffer[at + len(CALL_CLOSE):]
                self._state = "text"
                if at < 0:
                    break
        deltas = [DeltaToolCall(index=len(self.calls) + i, id=call.id, type="function",
                                function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
                  for i, call in enumerate(calls)]
        self.calls.extend(calls)
        if not content and not deltas:
            return None
        return Delta(content=content or None, tool_calls=deltas or None)

    # ------------------------------------------------------------ helpers
    def _call_from(self, text: str, known_names_only: bool) -> ResponseToolCall | None:
        """A call from `{"name": ..., "arguments"/"parameters": ...}`, or None when it is not one."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        if known_names_only and value["name"] not in {tool.function.name for tool in self.calling.tools}:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return ResponseToolCall(id=call_id(), function=ResponseFunctionCall(name=value["name"], arguments=text))

    @staticmethod
    def _call_delta(call: ResponseToolCall, first: bool, arguments: str) -> Delta:
        if first:
            piece = DeltaToolCall(index=0, id=call.id, type="function",
                                  function=DeltaFunctionCall(name=call.function.name, arguments=arguments))
        else:
            piece = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=arguments))
        return Delta(tool_calls=[piece])
