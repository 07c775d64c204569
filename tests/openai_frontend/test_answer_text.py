"""Streamed tokens to text: the same text as decoding them at once, cut before a stop string."""

from __future__ import annotations

import pytest

from openai_frontend.text import AnswerText
from python_backend_utils.triton_glue.tokenizer import load_tokenizer

ANSWER = "The capital of France is Paris. It is known for the Eiffel Tower, café culture and ☕."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer({})


def stream(tokenizer, stops: list[str]) -> tuple[AnswerText, list[str]]:
    prompt = tokenizer.encode("Question: ")
    text = AnswerText(tokenizer, prompt, stops)
    pieces = []
    for token in tokenizer.encode(ANSWER, add_special_tokens=False):
        pieces.append(text.add([token]))
        if text.stopped:
            break
    pieces.append(text.finish())
    return text, pieces


def test_streamed_pieces_add_up_to_the_whole_text(tokenizer):
    text, pieces = stream(tokenizer, [])
    assert "".join(pieces) == text.text == ANSWER
    assert not text.stopped
    assert text.token_count == len(tokenizer.encode(ANSWER, add_special_tokens=False))


@pytest.mark.parametrize("stops, expected", [
    (["Paris"], "The capital of France is "),
    ([". It", "Eiffel"], "The capital of France is Paris"),
    (["nowhere", "café"], "The capital of France is Paris. It is known for the Eiffel Tower, "),
])
def test_the_answer_ends_before_the_first_stop_string(tokenizer, stops, expected):
    text, pieces = stream(tokenizer, stops)
    assert text.stopped and text.text == expected
    assert "".join(pieces) == expected


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    text = AnswerText(tokenizer, [], ["Paris is"])
    assert text.add(tokenizer.encode("Capital: Par", add_special_tokens=False)) == "Capital: "
    assert text.add(tokenizer.encode("rot", add_special_tokens=False)) == "Parrot"


@pytest.mark.parametrize("skip, expected", [(True, "Paris"), (False, "Paris<|im_end|>")])
def test_special_tokens_are_left_out_unless_asked_for(tokenizer, skip, expected):
    text = AnswerText(tokenizer, tokenizer.encode("Question: "), [], skip_special_tokens=skip)
    for token in tokenizer.encode("Paris<|im_end|>", add_special_tokens=False):
        text.add([token])
    assert text.text == expected
