"""A checkpoint's chat template, rendered as transformers' `apply_chat_template(..., tokenize=False)`
does: the same Jinja sandbox settings, filters and globals, the special tokens in the context,
without importing transformers (and torch) into the frontend."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception) or failed to render it."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _template_source(model_dir: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template, as in transformers."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((entry["template"] for entry in template if entry.get("name") == "default"), None)
    return template or None


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class ChatTemplate:
    """Renders a list of messages into the prompt text, ending with the assistant's turn opened."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        self._template = environment.from_string(source)
        self._special_tokens = special_tokens
        # Templates that render tools read the `tools` variable; the others ignore any given.
        self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(environment.parse(source))

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> ChatTemplate | None:
        """The checkpoint's template, or None when it has none."""
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = _template_source(model_dir, config)
        if source is None:
            return None
        special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name)))}
        return cls(source, special)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return self._template.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=True, **self._special_tokens
            )
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(f"the model's chat template refused the messages: {error}") from None
