"""Conversions between Triton tensors (as numpy arrays) and the engine's types.

Tensor names and layouts follow TensorRT-LLM's Triton models (preprocessing, tensorrt_llm,
postprocessing) so that steps of our ensemble can be swapped for theirs and their clients work.
Nothing here imports triton_python_backend_utils: the model.py files wrap these arrays in
pb_utils tensors, and everything below can be tested without a server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from python_backend_utils.engine.sampling_params import GuidedDecoding, SamplingParams
from python_backend_utils.errors import InvalidRequestError
from python_backend_utils.triton_glue.detokenize import PRECEDING_TOKENS
from python_backend_utils.triton_glue.input_limits import MAX_PROMPT_IDS, MAX_WORD_LIST_IDS, check_size


class TritonTensor(Protocol):
    def name(self) -> str: ...
    def as_numpy(self) -> np.ndarray: ...


class TritonRequest(Protocol):
    def inputs(self) -> list[TritonTensor]: ...


def model_parameters(model_config_json: str) -> dict[str, str]:
    """The `parameters` of a config.pbtxt as plain strings (Triton hands them over as JSON)."""
    parameters = json.loads(model_config_json).get("parameters", {})
    return {name: value["string_value"] for name, value in parameters.items()}


def request_inputs(request: TritonRequest) -> dict[str, np.ndarray]:
    """Every input the client sent, by name; optional inputs it left out are absent."""
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def scalar(inputs: dict[str, np.ndarray], name: str, default):
    """The single value of a [1]-shaped input, or `default` when the input was not sent."""
    value = inputs.get(name)
    if value is None:
        return default
    if value.size != 1:
        raise InvalidRequestError(f"{name} must hold exactly one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def decode_text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(f"{name} is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def encode_word_list(words: list[list[int]]) -> np.ndarray:
    """TensorRT-LLM's word-list layout: [2, N] int32, row 0 the words' ids back to back, row 1 the
    end offset of each word; the ids row is padded with 0 and the offsets row with -1.
    No words is [[0], [-1]], so the tensor is never empty."""
    flat = [token for word in words for token in word]
    offsets = np.cumsum([len(word) for word in words]).tolist()
    width = max(len(flat), len(offsets), 1)
    encoded = np.zeros((2, width), dtype=np.int32)
    encoded[0, : len(flat)] = flat
    encoded[1, :] = -1
    encoded[1, : len(offsets)] = offsets
    return encoded


def decode_word_list(encoded: np.ndarray | None, name: str) -> tuple[tuple[int, ...], ...]:
    """The inverse of encode_word_list (a leading batch dimension of 1 is accepted)."""
    if encoded is None:
        return ()
    if encoded.ndim == 3 and encoded.shape[0] == 1:
        encoded = encoded[0]
    if encoded.ndim != 2 or encoded.shape[0] != 2:
        raise InvalidRequestError(f"{name} must have shape [2, N], got {list(encoded.shape)}")
    check_size(name, encoded.shape[1], MAX_WORD_LIST_IDS, "ids")
    ids, offsets = encoded[0].tolist(), encoded[1].tolist()
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        if not start <= end <= len(ids):
            raise InvalidRequestError(f"{name} has an offset {end} outside its {len(ids)} ids")
        words.append(tuple(ids[start:end]))
        start = end
    return tuple(words)


def decode_logit_bias(ids: np.ndarray | None, values: np.ndarray | None) -> tuple[tuple[int, float], ...]:
    """logit_bias_ids and logit_bias_values, one bias per id, as (id, bias) pairs."""
    if ids is None and values is None:
        return ()
    if ids is None or values is None or ids.size != values.size:
        raise InvalidRequestError("logit_bias_ids and logit_bias_values go together, one bias per id")
    return tuple(zip(ids.reshape(-1).tolist(), values.reshape(-1).tolist()))


@dataclass(frozen=True)
class GenerationRequest:
    """One request to the middle step (`aggregated`, later `disaggregated_serving_bls`)."""

    prompt_ids: list[int]
    params: SamplingParams
    streaming: bool
    exclude_input_in_output: bool


def generation_request(inputs: dict[str, np.ndarray]) -> GenerationRequest:
    """Read the middle step's inputs, named as in TensorRT-LLM's `tensorrt_llm` model.

    pad_id is accepted for compatibility and checked, but unused: nothing is padded here.
    """
    if "input_ids" not in inputs:  # Triton checks only how many inputs came, not which
        raise InvalidRequestError("input_ids is required: send the prompt's token ids")
    input_ids = inputs["input_ids"].reshape(-1)
    check_size("input_ids", input_ids.size, MAX_PROMPT_IDS, "token ids")
    length = scalar(inputs, "input_lengths", len(input_ids))
    if not 0 <= length <= len(input_ids):
        raise InvalidRequestError(f"input_lengths is {length} but input_ids holds {len(input_ids)} tokens")
    params = SamplingParams(
        max_tokens=scalar(inputs, "request_output_len", SamplingParams.max_tokens),
        temperature=scalar(inputs, "temperature", SamplingParams.temperature),
        top_k=scalar(inputs, "runtime_top_k", SamplingParams.top_k),
        top_p=scalar(inputs, "runtime_top_p", SamplingParams.top_p),
        seed=scalar(inputs, "random_seed", None),
        end_id=scalar(inputs, "end_id", None),
        pad_id=scalar(inputs, "pad_id", None),
        stop_words=decode_word_list(inputs.get("stop_words_list"), "stop_words_list"),
        bad_words=decode_word_list(inputs.get("bad_words_list"), "bad_words_list"),
        return_log_probs=bool(scalar(inputs, "return_log_probs", False)),
        min_tokens=scalar(inputs, "min_length", 0),
        guided_decoding=guided_decoding(inputs),
        presence_penalty=scalar(inputs, "presence_penalty", SamplingParams.presence_penalty),
        frequency_penalty=scalar(inputs, "frequency_penalty", SamplingParams.frequency_penalty),
        repetition_penalty=scalar(inputs, "repetition_penalty", SamplingParams.repetition_penalty),
        min_p=scalar(inputs, "min_p", SamplingParams.min_p),
        logit_bias=decode_logit_bias(inputs.get("logit_bias_ids"), inputs.get("logit_bias_values")),
        top_logprobs=scalar(inputs, "top_logprobs", SamplingParams.top_logprobs),
        prompt_log_probs=bool(scalar(inputs, "return_prompt_log_probs", False)),
    )
    return GenerationRequest(
        prompt_ids=input_ids[:length].tolist(),
        params=params,
        streaming=bool(scalar(inputs, "streaming", False)),
        exclude_input_in_output=bool(scalar(inputs, "exclude_input_in_output", False)),
    )


def guided_decoding(inputs: dict[str, np.ndarray]) -> GuidedDecoding | None:
    """TensorRT-LLM's guided_decoding_guide_type and guided_decoding_guide, as strings."""
    guide_type = _string(inputs, "guided_decoding_guide_type")
    guide = _string(inputs, "guided_decoding_guide")
    if guide_type is None:
        if guide:
            raise InvalidRequestError("guided_decoding_guide needs guided_decoding_guide_type: say what the guide is")
        return None
    return GuidedDecoding(guide_type, guide or "")


def _string(inputs: dict[str, np.ndarray], name: str) -> str | None:
    """The single value of a [1]-shaped string (BYTES) input, or None when it was not sent."""
    value = inputs.get(name)
    if value is None:
        return None
    if value.size != 1:
        raise InvalidRequestError(f"{name} must hold exactly one value, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    return decode_text(item, name) if isinstance(item, bytes) else str(item)


@dataclass(frozen=True)
class MiddleResponse:
    """What the middle step sends: output tensors (none for a bare end-of-stream) and the final flag."""

    tensors: dict[str, np.ndarray]
    final: bool


class ResponseAssembler:
    """Turns the engine's outputs for one request into the middle step's responses.

    Streaming: one response per output that carries tokens; the stream ends with the last one
    (or with a bare final flag when the last output is empty, e.g. the end id was dropped).
    Not streaming: one response at the end with every token (after the prompt's, unless
    exclude_input_in_output). Each response carries `preceding_ids`, the tokens right before
    `output_ids`, so postprocessing can detokenize without keeping state.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self._streaming = request.streaming
        self._include_prompt = not request.streaming and not request.exclude_input_in_output
        self._prompt = list(request.prompt_ids)
        self._top_logprobs = request.params.top_logprobs
        self._generated: list[int] = []
        self._log_probs: list[float] = []
        self._top: list[list[tuple[int, float]]] = []
        self._prompt_log_probs: list[tuple[float, list[tuple[int, float]]]] = []  # sent with the first response
        self._emitted = 0  # generated tokens already sent

    def add(self, token_ids: list[int], log_probs: list[float], finished: bool,
            top_log_probs: list[list[tuple[int, float]]] | None = None,
            prompt_log_probs: list[tuple[float, list[tuple[int, float]]]] | None = None) -> MiddleResponse | None:
        """The response to send for these new tokens, if any (log_probs, top_log_probs and
        prompt_log_probs empty when not asked for)."""
        self._prompt_log_probs += prompt_log_probs or []
        self._generated += token_ids
        self._log_probs += log_probs or [0.0] * len(token_ids)
        self._top += top_log_probs or [[]] * len(token_ids)
        if self._streaming and token_ids:
            return MiddleResponse(self._tensors(), finished)
        if finished:
            return MiddleResponse(self._tensors() if not self._streaming else {}, True)
        return None

    def add_outputs(self, outputs: dict[str, np.ndarray], finished: bool) -> MiddleResponse | None:
        """add() for a worker's response: its output_ids, output_log_probs and alternatives tensors."""
        empty = np.zeros(0)
        return self.add(outputs.get("output_ids", empty).reshape(-1).tolist(),
                        outputs.get("output_log_probs", empty).reshape(-1).tolist(), finished,
                        top_log_probs_of(outputs), prompt_log_probs_of(outputs))

    def _tensors(self) -> dict[str, np.ndarray]:
        history = self._prompt + self._generated[: self._emitted]
        new_ids = self._generated[self._emitted :]
        new_log_probs = self._log_probs[self._emitted :]
        new_top = self._top[self._emitted :]
        self._emitted = len(self._generated)
        if self._include_prompt:
            output_ids, preceding = history + new_ids, []
        else:
            output_ids, preceding = new_ids, history[-PRECEDING_TOKENS:]
        tensors = {
            "output_ids": np.asarray(output_ids, dtype=np.int32),
            "preceding_ids": np.asarray(preceding, dtype=np.int32),
            "sequence_length": np.asarray([len(output_ids)], dtype=np.int32),
            "cum_log_probs": np.asarray([sum(self._log_probs)], dtype=np.float32),
            "output_log_probs": np.asarray(new_log_probs, dtype=np.float32),
            **top_log_prob_tensors(new_top, self._top_logprobs),
            **prompt_log_prob_tensors(self._prompt_log_probs, self._top_logprobs),
        }
        self._prompt_log_probs = []
        return tensors


# What top_log_prob_tensors and prompt_log_prob_tensors fill in.
ALTERNATIVES_OUTPUTS = ("top_log_prob_ids", "top_log_probs", "prompt_log_probs", "prompt_top_log_prob_ids",
                        "prompt_top_log_probs")


def top_log_prob_tensors(top: list[list[tuple[int, float]]], width: int) -> dict[str, np.ndarray]:
    """`top_log_prob_ids` and `top_log_probs`, [tokens, width]: each token's likeliest alternatives."""
    ids = np.zeros((len(top), width), dtype=np.int32)
    values = np.full((len(top), width), -np.inf, dtype=np.float32)
    for row, entries in enumerate(top):
        for column, (token, log_prob) in enumerate(entries[:width]):
            ids[row, column], values[row, column] = token, log_prob
    return {"top_log_prob_ids": ids, "top_log_probs": values}


def top_log_probs_of(outputs: dict[str, np.ndarray]) -> list[list[tuple[int, float]]]:
    """The inverse of top_log_prob_tensors; [] when the response has none."""
    ids, values = outputs.get("top_log_prob_ids"), outputs.get("top_log_probs")
    if ids is None or values is None or ids.ndim != 2:
        return []
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def prompt_log_prob_tensors(entries: list[tuple[float, list[tuple[int, float]]]], width: int) -> dict[str, np.ndarray]:
    """`prompt_log_probs` [n] and `prompt_top_log_prob_ids` / `prompt_top_log_probs` [n, width]: the
    prompt's tokens from the second on (empty in every response but the first)."""
    top = top_log_prob_tensors([alternatives for _, alternatives in entries], width)
    return {"prompt_log_probs": np.asarray([log_prob for log_prob, _ in entries], dtype=np.float32),
            "prompt_top_log_prob_ids": top["top_log_prob_ids"], "prompt_top_log_probs": top["top_log_probs"]}


def prompt_log_probs_of(outputs: dict[str, np.ndarray]) -> list[tuple[float, list[tuple[int, float]]]]:
    """The inverse of prompt_log_prob_tensors; [] when the response has none."""
    values = outputs.get("prompt_log_probs")
    if values is None or not values.size:
        return []
    top = top_log_probs_of({"top_log_prob_ids": outputs.get("prompt_top_log_prob_ids"),
                            "top_log_probs": outputs.get("prompt_top_log_probs")})
    return list(zip(values.reshape(-1).tolist(), top or [[]] * values.size))


def joined_outputs(responses: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several responses of one worker request as one: each output's values one after the other."""
    names = {name for outputs in responses for name in outputs}
    return {name: np.concatenate([outputs[name] for outputs in responses if name in outputs]) for name in names}
