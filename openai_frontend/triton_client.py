"""Generation requests to the Triton model behind the ensemble, over tritonclient's asyncio gRPC
streaming, one stream per request.

The frontend calls the ensemble's middle step (`disaggregated_serving_bls`, or `aggregated` in
aggregated mode) with the prompt's token ids rather than `ensemble` with its text: Triton 2.51
does not pass a cancelled ensemble request on to its running step, so a client that went away
would keep its KV until max_tokens; the middle step sees the cancellation and stops the
instances running it. Tokenizing here (the tokenizer preprocessing uses) is also what gives the
usage counts, and the streamed token ids are counted as they come.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import np_to_triton_dtype

from openai_frontend.guided import Guide
from python_backend_utils.grpc_streams import end_stream

# An error ends the stream with its gRPC status, so the engine's INVALID_ARG stays a 400.
STREAM_HEADERS = {"triton_grpc_error": "true"}
NOT_READY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    min_tokens: int
    return_log_probs: bool
    guide: Guide | None = None  # structured output: the grammar the answer follows
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    prompt_log_probs: bool = False

    def arrays(self) -> dict[str, np.ndarray]:
        """The middle step's inputs (TensorRT-LLM's tensorrt_llm names) for these settings."""
        arrays = {
            "request_output_len": np.array([self.max_tokens], np.int32),
            "temperature": np.array([self.temperature], np.float32),
            "runtime_top_p": np.array([self.top_p], np.float32),
            "runtime_top_k": np.array([self.top_k], np.int32),
            "min_length": np.array([self.min_tokens], np.int32),
            "return_log_probs": np.array([self.return_log_probs]),
            "streaming": np.array([True]),
        }
        if self.seed is not None:
            arrays["random_seed"] = np.array([self.seed], np.uint64)
        if self.guide is not None:
            arrays["guided_decoding_guide_type"] = np.array([self.guide.guide_type.encode()], np.object_)
            arrays["guided_decoding_guide"] = np.array([self.guide.guide.encode()], np.object_)
        arrays.update(self._logit_processing_arrays())
        return arrays

    def _logit_processing_arrays(self) -> dict[str, np.ndarray]:
        """Penalties, biases, min_p and top_logprobs: sent only when they change something."""
        arrays = {}
        for name, value, off in (("presence_penalty", self.presence_penalty, 0.0),
                                 ("frequency_penalty", self.frequency_penalty, 0.0),
                                 ("repetition_penalty", self.repetition_penalty, 1.0), ("min_p", self.min_p, 0.0)):
            if value != off:
                arrays[name] = np.array([value], np.float32)
        if self.logit_bias:
            arrays["logit_bias_ids"] = np.array([token for token, _ in self.logit_bias], np.int32)
            arrays["logit_bias_values"] = np.array([bias for _, bias in self.logit_bias], np.float32)
        if self.top_logprobs:
            arrays["top_logprobs"] = np.array([self.top_logprobs], np.int32)
        if self.prompt_log_probs:
            arrays["return_prompt_log_probs"] = np.array([True])
        return arrays


@dataclass(frozen=True)
class TokenChunk:
    token_ids: list[int]
    log_probs: list[float]  # empty unless asked for
    top_log_probs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, if asked
    # the first chunk, if asked: (log-probability, top alternatives) of each prompt token from the second on
    prompt_log_probs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


class GenerationError(Exception):
    """A request Triton did not complete; `status` is the HTTP status the client gets."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _classify(error: grpc.aio.AioRpcError) -> GenerationError:
    details = error.details() or error.code().name
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return GenerationError(details, 400)
    if error.code() in NOT_READY:
        return GenerationError(f"the model is not ready: {details}", 503)
    return GenerationError(f"generation failed: {error.code().name}: {details}", 500)


def _top_log_probs(result, prefix: str) -> list[list[tuple[int, float]]]:
    """Each token's likeliest (id, log-probability) pairs, from top_log_prob_ids and top_log_probs
    (prompt_top_log_prob_ids and prompt_top_log_probs: prefix "prompt_")."""
    ids, values = result.as_numpy(f"{prefix}top_log_prob_ids"), result.as_numpy(f"{prefix}top_log_probs")
    if ids is None or values is None:
        return []
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def _prompt_log_probs(result) -> list[tuple[float, list[tuple[int, float]]]]:
    values = result.as_numpy("prompt_log_probs")
    if values is None:
        return []
    return list(zip(values.tolist(), _top_log_probs(result, "prompt_") or [[]] * values.size))


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    return tensor.set_data_from_numpy(array)


class TritonGenerator:
    """Streams the tokens of one request at a time from `model` on the tritonserver at `url`.

    The gRPC client belongs to the event loop it was made on: call `open()` on the serving loop."""

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self._client: grpcaio.InferenceServerClient | None = None

    def open(self) -> None:
        self._client = grpcaio.InferenceServerClient(self.url)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def ready(self) -> bool:
        try:
            return await self._client.is_server_ready() and await self._client.is_model_ready(self.model)
        except Exception:  # noqa: BLE001 - unreachable, starting, stopping: all of them "not ready"
            return False

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[TokenChunk]:
        """The tokens as they come. Closing the iterator early (or cancelling its task) cancels
        the stream, which stops the request on every instance running it."""
        arrays = {"input_ids": np.asarray(prompt_ids, np.int32), **params.arrays()}
        finished = asyncio.Event()

        async def one_request():
            yield {
                "model_name": self.model,
                "inputs": [_tensor(name, array) for name, array in arrays.items()],
                "parameters": {"triton_enable_empty_final_response": True},
            }
            await finished.wait()  # our side stays open until the final response

        call = self._client.stream_infer(one_request(), headers=STREAM_HEADERS)
        answered = False
        try:
            async for result, error in call:
                if error is not None:
                    answered = True
                    raise GenerationError(f"generation failed: {error.message()}", 500)
                token_ids = result.as_numpy("output_ids")
                if token_ids is not None and token_ids.size:
                    log_probs = result.as_numpy("output_log_probs") if params.return_log_probs else None
                    top = _top_log_probs(result, "") if params.top_logprobs else []
                    prompt = _prompt_log_probs(result) if params.prompt_log_probs else []
                    yield TokenChunk(token_ids.tolist(), [] if log_probs is None else log_probs.tolist(), top, prompt)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    answered = True
                    return
            raise GenerationError("the stream ended before its final response", 500)
        except grpc.aio.AioRpcError as error:
            raise _classify(error) from None
        finally:
            finished.set()
            if answered:
                await end_stream(call)
            else:
                call.cancel()  # the client left, or the call broke: stop the request everywhere
