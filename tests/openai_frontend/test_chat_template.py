"""The frontend's chat-template rendering against transformers' apply_chat_template."""

from __future__ import annotations

import json

import pytest

from openai_frontend.chat_template import ChatTemplate, ChatTemplateError
from python_backend_utils.environment import default_model_dir

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about \"quotes\" & <tags>, café ☕"},
    ],
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_equals_transformers(reference, messages):
    template = ChatTemplate.from_checkpoint(default_model_dir())
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.render(messages) == expected


def write_checkpoint(directory, config: dict, jinja: str | None = None):
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    return directory


def test_template_from_tokenizer_config_sees_the_special_tokens(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    checkpoint = write_checkpoint(tmp_path / "c", {"chat_template": template, "bos_token": "<s>",
                                                   "eos_token": {"content": "</s>"}})
    rendered = ChatTemplate.from_checkpoint(checkpoint).render([{"role": "user", "content": "hi"}])
    assert rendered == "<s>user: hi</s>"


def test_jinja_file_wins_over_the_config_and_a_checkpoint_may_have_none(tmp_path):
    both = write_checkpoint(tmp_path / "both", {"chat_template": "config"}, jinja="file")
    assert ChatTemplate.from_checkpoint(both).render([]) == "file"
    assert ChatTemplate.from_checkpoint(write_checkpoint(tmp_path / "none", {})) is None


def test_a_template_that_raises_is_a_chat_template_error(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "c", {}, jinja="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate.from_checkpoint(checkpoint).render([{"role": "user", "content": "x"}])
