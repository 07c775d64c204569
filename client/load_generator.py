"""Load against a Triton LLM model over gRPC streaming: fixed concurrency or Poisson arrivals.

Each request gets a bidirectional stream of its own (tritonclient.grpc.aio `stream_infer`, all
on one connection), so responses need no demultiplexing by request id and a request is cancelled
(the server stops generating) by cancelling its stream. The inputs' names, data types and shapes come from the
server's model metadata, so the same code drives `ensemble` ([1]-shaped inputs), a TensorRT-LLM
ensemble with a batch dimension ([1, 1]) or a model that runs only the context phase.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import triton_to_np_dtype

from client.datasets import BenchmarkRequest
from client.metrics import CANCELLED, ERROR, OK, RequestMeasurement
from python_backend_utils.grpc_streams import end_stream

TEXT_OUTPUT = "text_output"
# Inputs that make the server generate exactly max_tokens (vLLM's and TensorRT-LLM's names),
# with the value each one takes for a request.
EOS_SUPPRESSING_INPUTS: dict[str, Callable[[BenchmarkRequest], object]] = {
    "ignore_eos": lambda request: True,
    "min_tokens": lambda request: request.max_tokens,
    "min_length": lambda request: request.max_tokens,
}


class ModelInterfaceError(RuntimeError):
    """The model does not declare the inputs or outputs the benchmark needs."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # a variable dimension (-1, the batch one included) becomes 1

    def tensor(self, value: object) -> InferInput:
        dtype = np.object_ if self.datatype == "BYTES" else triton_to_np_dtype(self.datatype)
        if isinstance(value, str):
            value = value.encode("utf-8")
        array = np.full(self.shape, value, dtype=dtype)
        tensor = InferInput(self.name, list(self.shape), self.datatype)
        tensor.set_data_from_numpy(array)
        return tensor


@dataclass(frozen=True)
class ModelInterface:
    """The inputs the model declares (from its metadata) that the benchmark fills in."""

    inputs: dict[str, TensorSpec]

    @classmethod
    def from_metadata(cls, metadata: dict) -> ModelInterface:
        inputs = {
            entry["name"]: TensorSpec(
                entry["name"], entry["datatype"], tuple(1 if int(d) < 0 else int(d) for d in entry["shape"])
            )
            for entry in metadata["inputs"]
        }
        missing = [name for name in ("text_input", "max_tokens") if name not in inputs]
        if missing:
            raise ModelInterfaceError(f"model {metadata['name']} declares no input {', '.join(missing)}")
        if TEXT_OUTPUT not in {entry["name"] for entry in metadata["outputs"]}:
            raise ModelInterfaceError(f"model {metadata['name']} declares no output {TEXT_OUTPUT}")
        return cls(inputs)

    @property
    def eos_suppressing_input(self) -> str | None:
        """The input that makes the server ignore the end token, if it has one."""
        return next((name for name in EOS_SUPPRESSING_INPUTS if name in self.inputs), None)

    def tensors(self, request: BenchmarkRequest, temperature: float | None, random_seed: int) -> list[InferInput]:
        values: dict[str, object] = {"text_input": request.prompt, "max_tokens": request.max_tokens}
        optional: dict[str, object] = {"stream": True, "exclude_input_in_output": True}
        if self.eos_suppressing_input is not None:
            optional[self.eos_suppressing_input] = EOS_SUPPRESSING_INPUTS[self.eos_suppressing_input](request)
        if temperature is not None:
            for name in ("temperature", "random_seed"):
                if name not in self.inputs:
                    raise ModelInterfaceError(f"--temperature needs a {name} input, which the model does not declare")
            values.update(temperature=temperature, random_seed=random_seed)
        values.update({name: value for name, value in optional.items() if name in self.inputs})
        return [self.inputs[name].tensor(value) for name, value in values.items()]


@dataclass
class StreamTiming:
    """What the client saw of one request; times from time.perf_counter()."""

    index: int
    sent_at: float
    response_times: list[float]
    final_at: float | None = None
    text: str = ""
    error: str | None = None
    cancelled: bool = False

    def measurement(self, request: BenchmarkRequest, phase_start: float, retokenized: int) -> RequestMeasurement:
        """The request's latencies; `phase_start` is when the measured phase began, `retokenized`
        the tokenizer's count of the streamed text."""
        status, error = (CANCELLED, None) if self.cancelled else (ERROR, self.error) if self.error else (OK, None)
        if status == OK and not self.response_times:
            status, error = ERROR, "the final response came without any text_output"
        times = self.response_times
        return RequestMeasurement(
            index=self.index,
            status=status,
            start_s=self.sent_at - phase_start,
            input_tokens=request.input_tokens,
            max_tokens=request.max_tokens,
            output_tokens=len(times),
            retokenized_output_tokens=retokenized,
            ttft_s=times[0] - self.sent_at if times else None,
            e2e_s=self.final_at - self.sent_at if self.final_at is not None else None,
            itl_s=tuple(later - earlier for earlier, later in zip(times, times[1:])),
            error=error,
        )


async def stream_request(
    client: grpcclient_aio.InferenceServerClient, model: str, index: int, inputs: list[InferInput]
) -> StreamTiming:
    """Send one request on a stream of its own and time every response until the final one."""
    finished = asyncio.Event()

    async def one_request():
        yield {
            "model_name": model,
            "inputs": inputs,
            "request_id": str(index),
            # the final flag arrives even when the model sends it without outputs
            "parameters": {"triton_enable_empty_final_response": True},
        }
        await finished.wait()  # keep our side open until the final response

    timing = StreamTiming(index, time.perf_counter(), [])
    texts: list[str] = []
    responses = client.stream_infer(one_request())
    answered = False
    try:
        async for result, error in responses:
            now = time.perf_counter()
            if error is not None:
                timing.error = str(error)
                answered = True
                break
            output = result.as_numpy(TEXT_OUTPUT)
            if output is not None:
                timing.response_times.append(now)
                texts.append(output.reshape(-1)[0].decode("utf-8", errors="replace"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                timing.final_at = now
                answered = True
                break
        else:
            timing.error = "the stream ended before the final response"
    except asyncio.CancelledError:
        timing.cancelled = True
    except Exception as error:  # noqa: BLE001 - a broken stream (server gone, deadline): this request failed, the run goes on
        timing.error = f"{type(error).__name__}: {error}"
    finally:
        finished.set()
        if answered:
            await end_stream(responses)
        else:
            responses.cancel()  # stops generation
    timing.text = "".join(texts)
    return timing


@dataclass(frozen=True)
class LoadPhase:
    timings: list[StreamTiming]  # every request sent, by index
    started_at: float  # time.perf_counter() when the first request could go
    duration_s: float  # until the last one finished or was cancelled


async def run_load(
    send: Callable[[int], Awaitable[StreamTiming]],
    count: int,
    time_limit_s: float,
    *,
    concurrency: int | None = None,
    arrivals: Sequence[float] | None = None,
    on_done: Callable[[StreamTiming], None] = lambda timing: None,
) -> LoadPhase:
    """Send requests 0..count-1 with `concurrency` in flight (closed loop) or at the `arrivals`
    times (open loop), until all are done or `time_limit_s` has passed; what is still in flight
    then is cancelled."""
    if (concurrency is None) == (arrivals is None):
        raise ValueError("give exactly one of concurrency and arrivals")
    start = time.perf_counter()
    deadline = start + time_limit_s
    timings: list[StreamTiming] = []

    async def send_and_record(index: int) -> None:
        timing = await send(index)
        timings.append(timing)
        on_done(timing)

    async def closed_loop_worker(indexes) -> None:
        for index in indexes:
            if time.perf_counter() >= deadline:
                return
            await send_and_record(index)

    tasks: list[asyncio.Task] = []
    if concurrency is not None:
        indexes = iter(range(count))
        tasks = [asyncio.create_task(closed_loop_worker(indexes)) for _ in range(concurrency)]
    else:
        for index, offset in enumerate(arrivals[:count]):
            if start + offset >= deadline:
                break
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(send_and_record(index)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return LoadPhase(sorted(timings, key=lambda timing: timing.index), start, time.perf_counter() - start)
