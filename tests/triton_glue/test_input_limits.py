"""Oversized inputs are refused with an error naming the input and the limit, before they are
turned into Python lists or tokenized."""

from __future__ import annotations

import numpy as np
import pytest

from python_backend_utils.context_window import model_config, supported_window
from python_backend_utils.environment import CheckpointNotFoundError, resolve_model_dir
from python_backend_utils.errors import InvalidRequestError
from python_backend_utils.triton_glue.input_limits import (
    MAX_PROMPT_IDS,
    MAX_WORD_LIST_BYTES,
    MAX_WORD_LIST_IDS,
    MAX_WORDS,
    PromptTextLimit,
    check_words,
)
from python_backend_utils.triton_glue.io import decode_word_list, generation_request
from python_backend_utils.triton_glue.tokenizer import load_tokenizer, longest_token_bytes


def test_a_prompt_of_too_many_ids_is_refused():
    ids = np.ones(MAX_PROMPT_IDS + 1, dtype=np.int32)
    with pytest.raises(InvalidRequestError, match=f"input_ids holds {MAX_PROMPT_IDS + 1} token ids, more than the"):
        generation_request({"input_ids": ids})
    assert len(generation_request({"input_ids": ids[:MAX_PROMPT_IDS]}).prompt_ids) == MAX_PROMPT_IDS


def test_a_word_list_of_too_many_ids_is_refused():
    encoded = np.full((2, MAX_WORD_LIST_IDS + 1), -1, dtype=np.int32)
    with pytest.raises(InvalidRequestError, match=f"stop_words_list holds {MAX_WORD_LIST_IDS + 1} ids"):
        decode_word_list(encoded, "stop_words_list")
    assert decode_word_list(encoded[:, :MAX_WORD_LIST_IDS], "stop_words_list") == ()


def test_word_texts_are_bounded_in_count_and_bytes():
    check_words([b"w"] * MAX_WORDS, "stop_words")
    with pytest.raises(InvalidRequestError, match=f"stop_words holds {MAX_WORDS + 1} words"):
        check_words([b"w"] * (MAX_WORDS + 1), "stop_words")
    with pytest.raises(InvalidRequestError, match=f"bad_words holds {MAX_WORD_LIST_BYTES + 1} bytes"):
        check_words([b"x" * MAX_WORD_LIST_BYTES, b"y"], "bad_words")


def test_text_longer_than_the_window_can_hold_is_refused():
    limit = PromptTextLimit(window=100, longest_token_bytes=8)
    limit.check(b"a" * 800)
    with pytest.raises(InvalidRequestError, match="text_input has 801 bytes, more than fit in the model's context "
                                                  "window of 100 tokens \\(at most 800 bytes, 8 a token\\)"):
        limit.check(b"a" * 801)


def test_the_default_checkpoint_text_limit_never_refuses_a_prompt_that_fits():
    """The limit is the window times the longest token, so a text at the limit made of that token fits exactly."""
    try:
        model_dir = resolve_model_dir()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))
    tokenizer = load_tokenizer({"model_dir": str(model_dir)})
    longest = longest_token_bytes(tokenizer)
    limit = PromptTextLimit(supported_window(model_config(model_dir)), longest)
    assert (limit.window, longest) == (8192, 81)
    token_text = next(text for i in range(len(tokenizer)) if len((text := tokenizer.decode([i])).encode()) == longest)
    assert len(tokenizer.encode(token_text * 4, add_special_tokens=False)) == 4
