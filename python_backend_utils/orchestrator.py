"""The disaggregated request path, driven from an async BLS `execute`.

Per request: a context instance (chosen by its router) prefills and returns the first token,
which goes to the client at once; a generation instance (chosen by its router) pulls the KV
and streams the rest. A failed or timed-out context call is retried once on another context
instance, then the generation instance prefills locally; prompts shorter than the deployment's
threshold go straight there. The client-facing responses are assembled here, so streaming and
non-streaming clients see exactly what the aggregated model would send.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.deployment import Deployment
from python_backend_utils.errors import InvalidRequestError, RequestAbortedError
from python_backend_utils.llm_model import FINAL, error_response, send_tensors
from python_backend_utils.messages import RequestOutput
from python_backend_utils.routing import NoTargetError, Router, Target, make_router
from python_backend_utils.triton_io import ResponseAssembler, generation_request, request_inputs

logger = logging.getLogger(__name__)

WORKER_OUTPUTS = ["output_ids", "output_log_probs"]
# Python-backend 2.51 hands decoupled BLS responses out through a blocking iterator: each
# request in flight waits for its next response on one of these threads, off the event loop.
MAX_REQUESTS_IN_FLIGHT = 256
_END = object()
STOP_TIMEOUT_S = 5.0


class ResponseStream:
    """Async access to a blocking BLS response iterator."""

    def __init__(self, iterator, executor: concurrent.futures.Executor) -> None:
        self._iterator = iterator
        self._executor = executor

    async def next(self, timeout: float):
        """The next response, or None at the end of the stream; raises asyncio.TimeoutError."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, next, self._iterator, _END)
        response = await asyncio.wait_for(asyncio.shield(future), timeout)
        return None if response is _END else response


class ClientError(Exception):
    """A worker refused the request's content: the client must hear it, retrying elsewhere won't help."""

    def __init__(self, error) -> None:
        super().__init__(error.message())
        self.triton_error = error


class WorkerFailed(Exception):
    """A worker failed or did not answer in time."""


@dataclass
class OrchestratorStats:
    requests: int = 0
    disaggregated: int = 0
    local_prefill: int = 0  # conditional disaggregation: short prompts
    context_retries: int = 0
    context_fallbacks: int = 0  # every context attempt failed: prefilled on the generation instance
    cancelled: int = 0
    context_phase_seconds: float = 0.0
    generation_phase_seconds: float = 0.0
    output_tokens: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {
            "requests_total": self.requests,
            "disaggregated_total": self.disaggregated,
            "local_prefill_total": self.local_prefill,
            "context_retries_total": self.context_retries,
            "context_fallbacks_total": self.context_fallbacks,
            "cancelled_total": self.cancelled,
            "context_phase_seconds_total": self.context_phase_seconds,
            "generation_phase_seconds_total": self.generation_phase_seconds,
            "output_tokens_total": self.output_tokens,
        }


@dataclass(frozen=True)
class ContextResult:
    first_tokens: list[int]
    log_probs: list[float]
    params: np.ndarray | None  # context_phase_params; None when the request ended at its first token


class Orchestrator:
    def __init__(self, deployment: Deployment, context_block_size: int) -> None:
        self.deployment = deployment
        self.context_router = self._router(deployment.context_servers, context_block_size)
        self.generation_router = self._router(deployment.generation_servers, context_block_size)
        self.stats = OrchestratorStats()
        self._executor = concurrent.futures.ThreadPoolExecutor(MAX_REQUESTS_IN_FLIGHT, thread_name_prefix="bls")

    @staticmethod
    def _router(group, block_size: int) -> Router:
        targets = [Target(group.model_name, version) for version in range(1, group.num_instances + 1)]
        return make_router(targets, group.router, block_size)

    async def serve(self, request) -> None:
        sender = request.get_response_sender()
        try:
            await self._serve(request, sender)
        except ClientError as error:
            sender.send(pb_utils.InferenceResponse(error=error.triton_error), flags=FINAL)
        except Exception as error:  # noqa: BLE001 - every request ends with a final response
            if not isinstance(error, (InvalidRequestError, RequestAbortedError)):
                logger.exception("disaggregated request failed")
            sender.send(error_response(error), flags=FINAL)

    async def _serve(self, request, sender) -> None:
        self.stats.requests += 1
        generation = generation_request(request_inputs(request))
        assembler = ResponseAssembler(generation)
        request_id = uuid.uuid4().hex
        prompt = generation.prompt_ids
        worker_inputs = [t for t in request.inputs() if t.name() not in ("streaming", "stop")]
        worker_inputs.append(pb_utils.Tensor("streaming", np.array([True])))

        started = time.monotonic()

        def deliver(output: RequestOutput) -> None:
            self.stats.output_tokens += len(output.token_ids)
            response = assembler.add(output)
            if response is not None:
                send_tensors(sender, response.tensors, response.final)

        context = None
        if len(prompt) >= self.deployment.min_disaggregated_prompt_tokens:
            context = await self._context_phase(request_id, worker_inputs, prompt)
            if context is None:
                self.stats.context_fallbacks += 1
        else:
            self.stats.local_prefill += 1
        generation_started = time.monotonic()
        if context is not None:
            self.stats.disaggregated += 1
            self.stats.context_phase_seconds += generation_started - started
            finished = context.params is None
            deliver(RequestOutput(request_id, context.first_tokens, context.log_probs, finished, None))
            if finished:
                return
            worker_inputs.append(pb_utils.Tensor("context_phase_params", context.params))
        await self._generation_phase(request, request_id, worker_inputs, prompt, generation.params.max_tokens, deliver)
        self.stats.generation_phase_seconds += time.monotonic() - generation_started

    async def _context_phase(self, request_id: str, inputs, prompt: list[int]) -> ContextResult | None:
        tried: set[Target] = set()
        for attempt in range(2):
            try:
                target = self.context_router.choose(prompt, frozenset(tried))
            except NoTargetError:
                return None
            tried.add(target)
            if attempt:
                self.stats.context_retries += 1
            self.context_router.started(target, len(prompt))
            try:
                responses = await self._collect(target, f"{request_id}-ctx{attempt}", inputs,
                                                self.deployment.context_timeout_s)
            except ClientError:
                raise
            except Exception as error:  # noqa: BLE001 - failed, unreachable or timed out: try elsewhere
                logger.warning("context instance %s failed (%r); %s", target, error,
                               "retrying elsewhere" if attempt == 0 else "prefilling on the generation instance")
                await self._stop(target, f"{request_id}-ctx{attempt}")
                continue
            finally:
                self.context_router.finished(target, len(prompt))
            tokens, log_probs, params = [], [], None
            for response in responses:
                tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
                tokens += tensors.get("output_ids", np.zeros(0, np.int32)).reshape(-1).tolist()
                log_probs += tensors.get("output_log_probs", np.zeros(0, np.float32)).reshape(-1).tolist()
                if tensors.get("context_phase_params") is not None and tensors["context_phase_params"].size:
                    params = tensors["context_phase_params"].reshape(-1)
            return ContextResult(tokens, log_probs, params)
        return None

    async def _generation_phase(self, request, request_id, inputs, prompt, max_tokens, deliver) -> None:
        target = self.generation_router.choose(prompt)
        load = len(prompt) + max_tokens
        self.generation_router.started(target, load)
        worker_id = f"{request_id}-gen"
        try:
            responses = await self._exec(target, worker_id, inputs, self.deployment.context_timeout_s)
            while True:
                if request.is_cancelled():
                    self.stats.cancelled += 1
                    await self._stop(target, worker_id)
                    raise RequestAbortedError("the request was cancelled by the client")
                try:
                    response = await responses.next(self.deployment.generation_timeout_s)
                except asyncio.TimeoutError:
                    await self._stop(target, worker_id)
                    raise WorkerFailed(f"generation instance {target} sent nothing for "
                                       f"{self.deployment.generation_timeout_s} s") from None
                if response is None:
                    deliver(RequestOutput(request_id, [], [], True, None))
                    return
                self._raise_if_error(response, target)
                tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if tensors:
                    deliver(RequestOutput(request_id, tensors["output_ids"].reshape(-1).tolist(),
                                          tensors["output_log_probs"].reshape(-1).tolist(), False, None))
        finally:
            self.generation_router.finished(target, load)

    async def _exec(self, target: Target, worker_id: str, inputs, timeout: float) -> ResponseStream:
        inner = pb_utils.InferenceRequest(
            model_name=target.model_name,
            model_version=target.version,
            inputs=inputs,
            requested_output_names=WORKER_OUTPUTS + (["context_phase_params"] if target.model_name
                                                     == self.deployment.context_servers.model_name else []),
            request_id=worker_id,
        )
        # Submitting can itself hang on an instance whose stub died: bound it like every wait.
        return ResponseStream(await asyncio.wait_for(inner.async_exec(decoupled=True), timeout), self._executor)

    async def _collect(self, target: Target, worker_id: str, inputs, timeout: float) -> list:
        stream, responses = await self._exec(target, worker_id, inputs, timeout), []
        while (response := await stream.next(timeout)) is not None:
            self._raise_if_error(response, target)
            responses.append(response)
        return responses

    @staticmethod
    def _raise_if_error(response, target: Target) -> None:
        if not response.has_error():
            return
        error = response.error()
        if error.code() == pb_utils.TritonError.INVALID_ARG:
            raise ClientError(error)
        raise WorkerFailed(f"{target}: {error.message()}")

    async def _stop(self, target: Target, worker_id: str) -> None:
        """Ask an instance to abort a request it may still be running (its KV is freed)."""
        stop = pb_utils.InferenceRequest(
            model_name=target.model_name,
            model_version=target.version,
            inputs=[pb_utils.Tensor("input_ids", np.zeros(1, np.int32)), pb_utils.Tensor("stop", np.array([True]))],
            requested_output_names=[],
            request_id=worker_id,
        )
        try:
            submitted = await asyncio.wait_for(stop.async_exec(decoupled=True), STOP_TIMEOUT_S)
            await ResponseStream(submitted, self._executor).next(STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a dead instance has nothing left to stop
            logger.info("could not stop %s on %s", worker_id, target)
