"""Structured output: what a request asks its answer to follow, as the guide the engine compiles.

The guide travels to the engine as two strings, TensorRT-LLM's `guided_decoding_guide_type` and
`guided_decoding_guide` (the engine's grammar.py says what each type means); the frontend only
translates OpenAI's `response_format` and vLLM's `guided_*` / `structured_outputs` into them. An
invalid schema or regex is found by the engine's compiler and comes back as a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openai_frontend.schemas import ChatCompletionRequest, SamplingRequest


class GuideError(ValueError):
    """The request asks for more than one constraint, or for one this server cannot express."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Guide:
    guide_type: str  # "json" (any JSON object), "json_schema", "regex" or "ebnf_grammar"
    guide: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Guide:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> Guide:
        """Exactly one of `choices`: a grammar of string literals (JSON's escapes are EBNF's)."""
        return cls("ebnf_grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def requested_guide(request: SamplingRequest) -> Guide | None:
    """The one constraint the request asks for, if any; GuideError when it asks for several."""
    found: list[tuple[str, Guide]] = []
    if isinstance(request, ChatCompletionRequest) and request.response_format is not None:
        response_format = request.response_format
        if response_format.type == "json_object":
            found.append(("response_format", Guide("json")))
        elif response_format.type == "json_schema":
            schema = response_format.json_schema.json_schema
            found.append(("response_format", Guide.json_schema(schema if schema is not None else {})))
    if request.guided_json is not None:
        found.append(("guided_json", Guide.json_schema(request.guided_json)))
    if request.guided_regex is not None:
        found.append(("guided_regex", Guide("regex", request.guided_regex)))
    if request.guided_choice is not None:
        found.append(("guided_choice", Guide.choice(request.guided_choice)))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", Guide("ebnf_grammar", request.guided_grammar)))
    if (outputs := request.structured_outputs) is not None:
        for guide in (Guide.json_schema(outputs.json_schema) if outputs.json_schema is not None else None,
                      Guide("regex", outputs.regex) if outputs.regex is not None else None,
                      Guide.choice(outputs.choice) if outputs.choice is not None else None,
                      Guide("ebnf_grammar", outputs.grammar) if outputs.grammar is not None else None,
                      Guide("json") if outputs.json_object else None):
            if guide is not None:
                found.append(("structured_outputs", guide))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise GuideError(f"the request asks for several output constraints ({names}): send one", found[1][0])
    return found[0][1] if found else None
