"""Unit tests for what the pre/postprocessing and middle-step glue share: detokenization,
word lists, request parsing and response assembly (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.errors import InvalidRequestError
from python_backend_utils.triton_glue.detokenize import PRECEDING_TOKENS, complete_text, decode_increment
from python_backend_utils.triton_glue.io import (
    GenerationRequest,
    ResponseAssembler,
    decode_text,
    decode_word_list,
    encode_word_list,
    generation_request,
)
from python_backend_utils.triton_glue.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer: byte-level BPE, which splits multi-byte characters across tokens."""
    return load_tokenizer({})


def stream_text(tokenizer, prompt_ids: list[int], generated: list[int]) -> list[str]:
    """Detokenize one token at a time, as postprocessing sees a streamed request."""
    history = list(prompt_ids)
    pieces = []
    for token in generated:
        pieces.append(decode_increment(tokenizer, history[-PRECEDING_TOKENS:], [token]))
        history.append(token)
    return pieces


@pytest.mark.parametrize(
    "text",
    [
        "naïve café, señor",
        "emoji 😀👍🏽 and a family 👨‍👩‍👧",
        "中文字符和日本語のテキスト",
        "mixed: Ünïcödé 世界 🌍 ok",
    ],
)
def test_streamed_pieces_add_up_to_the_text_without_broken_characters(tokenizer, text):
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    generated = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream_text(tokenizer, prompt, generated)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_character_split_across_tokens_appears_once_when_complete(tokenizer):
    generated = tokenizer.encode("世界", add_special_tokens=False)
    assert len(generated) == 5, "世 and 界 (3 bytes each) span 2 and 3 tokens in this vocabulary"
    assert stream_text(tokenizer, [], generated) == ["", "世", "", "", "界"]


def test_an_incomplete_trailing_character_is_held_back(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    assert complete_text(tokenizer, ids[:-1]) == "ok "
    assert complete_text(tokenizer, ids) == "ok 😀"


def test_increment_depends_only_on_the_preceding_window(tokenizer):
    ids = tokenizer.encode("one two three four five six seven eight nine ten eleven", add_special_tokens=False)
    whole = decode_increment(tokenizer, ids[-PRECEDING_TOKENS - 1 : -1], ids[-1:])
    assert whole == decode_increment(tokenizer, ids[:-1], ids[-1:]) == " eleven"


def test_word_list_layout_matches_tensorrt_llm():
    encoded = encode_word_list([[11, 12], [13], [14, 15, 16]])
    assert encoded.dtype == np.int32
    assert encoded.tolist() == [[11, 12, 13, 14, 15, 16], [2, 3, 6, -1, -1, -1]]


def test_no_words_is_a_one_column_list():
    assert encode_word_list([]).tolist() == [[0], [-1]]
    assert decode_word_list(encode_word_list([]), "stop_words_list") == ()


def test_word_list_round_trip_with_and_without_batch_dimension():
    words = ((5,), (6, 7), (8, 9, 10))
    encoded = encode_word_list([list(w) for w in words])
    assert decode_word_list(encoded, "stop_words_list") == words
    assert decode_word_list(encoded[None], "stop_words_list") == words


def test_word_list_with_an_offset_past_its_ids_is_rejected():
    with pytest.raises(InvalidRequestError, match="bad_words_list has an offset 9"):
        decode_word_list(np.array([[1, 2], [9, -1]], dtype=np.int32), "bad_words_list")


def test_invalid_utf8_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="text_input is not valid UTF-8"):
        decode_text(b"caf\xe9", "text_input")


def test_generation_request_reads_tensorrt_llm_names_and_defaults():
    request = generation_request({"input_ids": np.array([1, 2, 3], dtype=np.int32)})
    assert request == GenerationRequest([1, 2, 3], SamplingParams(), streaming=False, exclude_input_in_output=False)
    request = generation_request(
        {
            "input_ids": np.array([1, 2, 3, 0], dtype=np.int32),
            "input_lengths": np.array([3], dtype=np.int32),
            "request_output_len": np.array([7], dtype=np.int32),
            "temperature": np.array([0.5], dtype=np.float32),
            "runtime_top_k": np.array([4], dtype=np.int32),
            "runtime_top_p": np.array([0.5], dtype=np.float32),
            "random_seed": np.array([9], dtype=np.uint64),
            "end_id": np.array([2], dtype=np.int32),
            "stop_words_list": encode_word_list([[5, 6]]),
            "bad_words_list": encode_word_list([[8]]),
            "return_log_probs": np.array([True]),
            "streaming": np.array([True]),
            "min_length": np.array([3], dtype=np.int32),
        }
    )
    assert request.prompt_ids == [1, 2, 3]
    assert request.params == SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_k=4,
        top_p=0.5,
        seed=9,
        end_id=2,
        stop_words=((5, 6),),
        bad_words=((8,),),
        min_tokens=3,
        return_log_probs=True,
    )
    assert request.streaming


def test_input_lengths_longer_than_input_ids_is_rejected():
    with pytest.raises(InvalidRequestError, match="input_lengths is 5"):
        generation_request({"input_ids": np.array([1, 2], dtype=np.int32), "input_lengths": np.array([5], dtype=np.int32)})


def output(tokens: list[int], finished: bool = False, log_probs: list[float] | None = None) -> tuple:
    return tokens, log_probs or [], finished


def test_streaming_sends_each_token_with_the_tokens_before_it():
    prompt = list(range(100, 110))
    assembler = ResponseAssembler(GenerationRequest(prompt, SamplingParams(), True, False))
    first = assembler.add(*output([1], log_probs=[-0.5]))
    second = assembler.add(*output([2], finished=True, log_probs=[-0.25]))
    assert first.final is False and second.final is True
    assert first.tensors["output_ids"].tolist() == [1]
    assert first.tensors["preceding_ids"].tolist() == prompt[-PRECEDING_TOKENS:]
    assert second.tensors["preceding_ids"].tolist() == prompt[-PRECEDING_TOKENS + 1 :] + [1]
    assert second.tensors["output_log_probs"].tolist() == [-0.25]
    assert second.tensors["cum_log_probs"].tolist() == [-0.75]


def test_streaming_ends_with_a_bare_final_flag_when_the_last_output_is_empty():
    assembler = ResponseAssembler(GenerationRequest([1], SamplingParams(), True, False))
    assembler.add(*output([5]))
    last = assembler.add(*output([], finished=True))
    assert last.final and last.tensors == {}


def test_non_streaming_sends_one_response_with_the_prompt_unless_excluded():
    with_prompt = ResponseAssembler(GenerationRequest([1, 2], SamplingParams(), False, False))
    assert with_prompt.add(*output([3])) is None
    response = with_prompt.add(*output([4], finished=True))
    assert response.final
    assert response.tensors["output_ids"].tolist() == [1, 2, 3, 4]
    assert response.tensors["preceding_ids"].tolist() == []
    assert response.tensors["sequence_length"].tolist() == [4]

    without_prompt = ResponseAssembler(GenerationRequest([1, 2], SamplingParams(), False, True))
    without_prompt.add(*output([3]))
    response = without_prompt.add(*output([4], finished=True))
    assert response.tensors["output_ids"].tolist() == [3, 4]
    assert response.tensors["preceding_ids"].tolist() == [1, 2]
