"""The disaggregated request path, driven from an async BLS `execute`.

Per request: a context instance (chosen by its router) prefills and returns the first token,
which goes to the client at once; a generation instance (chosen by its router) pulls the KV
and streams the rest. A failed or timed-out context call is retried once on another context
instance, then the generation instance prefills locally; prompts shorter than the deployment's
threshold go straight there. A generation call that fails before its first response is tried
once more on another generation instance. The client-facing responses are assembled here, so
streaming and non-streaming clients see exactly what the aggregated model would send.

Instances are workers of two kinds behind the same routers and the same logic: versions of a
model on this server, reached through BLS, and models on other servers (`remote.py`, gRPC).
Membership changes at runtime (`apply`, `set_health`, called from the membership thread).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend_utils.errors import UNAVAILABLE_PREFIX, InvalidRequestError, RequestAbortedError
from python_backend_utils.orchestration.admission import THREADS_PER_REQUEST, Admission, current_ticket, held
from python_backend_utils.orchestration.cancellation import ClientCancelled, unless_cancelled
from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.orchestration.membership import diff_workers, group_workers
from python_backend_utils.orchestration.remote import ClientError, RemoteWorkers, WorkerFailed, WorkerUnreachable
from python_backend_utils.orchestration.routing import NoWorkerError, Router, Worker, make_router
from python_backend_utils.orchestration.stats import OrchestratorStats
from python_backend_utils.orchestration.streams import LocalStream, StubDied, WorkerStream
from python_backend_utils.triton_glue import io as triton_io
from python_backend_utils.triton_glue.io import ResponseAssembler, generation_request, request_inputs
from python_backend_utils.triton_glue.responses import FINAL, error_response, send_tensors

logger = logging.getLogger(__name__)

WORKER_OUTPUTS = ["output_ids", "output_log_probs", *triton_io.ALTERNATIVES_OUTPUTS]
CONTEXT_OUTPUTS = WORKER_OUTPUTS + ["context_phase_params"]
# Python-backend 2.51 hands decoupled BLS responses out through a blocking iterator: each
# request in flight waits for its next response on a thread of its own, off the event loop
# (admission.py). Past this many requests at once, a new one is refused with UNAVAILABLE.
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 128
STOP_TIMEOUT_S = 5.0
# A request on an instance of this server that has been silent this long makes the orchestrator
# check that the instance's stub process still lives: requests running in a stub that died get
# no answer ever again, and the timeouts of a generation call are long.
CHECK_STUB_AFTER_S = 2.0
GROUPS = ("context", "generation")


@dataclass(frozen=True)
class ContextResult:
    outputs: dict[str, np.ndarray]  # the first token, its log-probabilities, the prompt's if asked for
    params: np.ndarray | None  # context_phase_params; None when the request ended at its first token
    worker: Worker
    worker_id: str  # the context instance holds the KV under this request id until it is pulled


class InstanceWatch(Protocol):
    """Whoever supervises the instances (the BLS model): told when a routed request could not reach a
    remote worker, or found the stub of one on this server dead; asked whether such a stub lives."""

    def unreachable(self, worker: Worker) -> None: ...
    def stub_died(self, worker: Worker) -> None: ...
    def stub_running(self, worker: Worker) -> bool: ...


class Orchestrator:
    def __init__(self, deployment: Deployment, context_block_size: int, watch: InstanceWatch,
                 max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT) -> None:
        self.deployment = deployment
        self.watch = watch
        self.block_size = context_block_size
        self.routers: dict[str, Router] = {
            name: make_router(group_workers(group), group.router, context_block_size)
            for name, group in zip(GROUPS, self._groups(deployment))
        }
        self.remote = RemoteWorkers()
        self.stats = OrchestratorStats()
        # Bumped when a local worker's stub is found dead and when its replacement is ready: a
        # request opened under an older count runs on a stub that is gone, whatever runs now.
        self._stub_generations: dict[Worker, int] = {}
        # Context instances holding a request's KV until its generation phase ends (after its pull):
        # a removed one is unloaded only when it holds none (local_workers.py).
        self._handoffs: collections.Counter[Worker] = collections.Counter()
        self.admission = Admission(max_requests_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(THREADS_PER_REQUEST * max_requests_in_flight,
                                                               thread_name_prefix="bls")
        self._loop_with_executor: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task] = set()  # referenced until done, or asyncio may drop them

    @property
    def context_router(self) -> Router:
        return self.routers["context"]

    @property
    def generation_router(self) -> Router:
        return self.routers["generation"]

    @staticmethod
    def _groups(deployment: Deployment):
        return deployment.context_servers, deployment.generation_servers

    # ------------------------------------------------------------ membership
    def apply(self, deployment: Deployment) -> None:
        """A new deployment: new workers take requests now, removed ones drain, settings apply."""
        for name, group in zip(GROUPS, self._groups(deployment)):
            router, workers = self.routers[name], group_workers(group)
            change = diff_workers(router.workers, workers)
            if group.router != router.config:
                replacement = make_router(workers, group.router, self.block_size)
                replacement.adopt(router)
                self.routers[name] = replacement
                logger.info("%s router is now %s", name, group.router)
            else:
                router.set_workers(workers)
            if change:
                logger.info("%s instances: added %s, removed %s (they finish what they run)", name,
                            [str(t) for t in change.added] or "none", [str(t) for t in change.removed] or "none")
        self.remote.set_urls({t.url for r in self.routers.values() for t in r.workers if t.url})
        self.deployment = deployment

    def set_health(self, worker: Worker, healthy: bool) -> None:
        for router in self.routers.values():
            router.set_healthy(worker, healthy)

    def holds_requests(self, worker: Worker) -> bool:
        """Whether the instance runs a request, or holds a KV its generation instance has yet to pull."""
        router = self.routers["context" if worker.model_name == self.deployment.context_servers.model_name
                              else "generation"]
        state = router.snapshot().get(worker)
        return bool(self._handoffs[worker] or (state is not None and state[2]))

    def remote_workers(self) -> list[Worker]:
        """Remote workers in rotation or draining: the ones health checks watch."""
        return [t for r in self.routers.values() for t in r.snapshot() if t.url]

    # ------------------------------------------------------------ requests
    def metrics(self) -> dict[str, float]:
        counts = self.admission.counts()
        return {**self.stats.as_metrics(), "requests_in_flight": counts.in_flight,
                "requests_lingering": counts.lingering, "rejected_total": counts.rejected}

    async def serve(self, request) -> None:
        self._use_executor_for_bls()
        sender = request.get_response_sender()
        ticket = self.admission.try_admit()
        if ticket is None:
            refusal = pb_utils.TritonError(
                f"{UNAVAILABLE_PREFIX}the orchestrator is serving its limit of {self.admission.limit} requests at once "
                "(max_requests_in_flight of disaggregated_serving_bls): retry later, or raise the limit",
                pb_utils.TritonError.UNAVAILABLE)
            sender.send(pb_utils.InferenceResponse(error=refusal), flags=FINAL)
            return
        token = current_ticket.set(ticket)  # the threads this request starts hold its place
        try:
            await self._serve(request, sender)
        except ClientError as error:
            refusal = pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
            sender.send(pb_utils.InferenceResponse(error=refusal), flags=FINAL)
        except Exception as error:  # noqa: BLE001 - every request ends with a final response
            if not isinstance(error, (InvalidRequestError, RequestAbortedError)):
                logger.exception("disaggregated request failed")
            sender.send(error_response(error), flags=FINAL)
        except asyncio.CancelledError:
            # Not an Exception: without this the client would wait for an answer that never comes.
            logger.exception("disaggregated request cancelled inside the orchestrator")
            sender.send(error_response(WorkerFailed("a call to a worker was cancelled inside the orchestrator")),
                        flags=FINAL)
            raise
        finally:
            current_ticket.reset(token)
            ticket.answered()

    def _use_executor_for_bls(self) -> None:
        """`InferenceRequest.async_exec` runs on the loop's default executor and holds a thread until
        the first response: with the default's min(32, cores + 4) threads (6 here), a burst of
        requests would wait in that queue before any of them reached a worker."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop_with_executor:
            loop.set_default_executor(self._executor)
            self._loop_with_executor = loop

    async def _serve(self, request, sender) -> None:
        self.stats.requests += 1
        inputs = request_inputs(request)
        generation = generation_request(inputs)
        assembler = ResponseAssembler(generation)
        request_id = uuid.uuid4().hex
        prompt = generation.prompt_ids
        self.stats.input_tokens += len(prompt)
        worker_inputs = {name: array for name, array in inputs.items() if name not in ("streaming", "stop")}
        worker_inputs["streaming"] = np.array([True])
        deployment = self.deployment

        started = time.monotonic()

        def deliver(outputs: dict[str, np.ndarray], finished: bool) -> None:
            self.stats.output_tokens += outputs["output_ids"].size if "output_ids" in outputs else 0
            response = assembler.add_outputs(outputs, finished)
            if response is not None:
                send_tensors(sender, response.tensors, response.final)

        context = None
        if len(prompt) >= deployment.min_disaggregated_prompt_tokens:
            context = await self._context_phase(request, request_id, worker_inputs, prompt, deployment)
            if context is None:
                self.stats.context_fallbacks += 1
        else:
            self.stats.local_prefill += 1
        generation_started = time.monotonic()
        if context is not None:
            self.stats.disaggregated += 1
            self.stats.context_phase_seconds += generation_started - started
            finished = context.params is None
            deliver(context.outputs, finished)
            if finished:
                return
            worker_inputs["context_phase_params"] = context.params
            self._handoffs[context.worker] += 1
        try:
            await self._generation_phase(request, request_id, worker_inputs, prompt, generation.params.max_tokens,
                                         deliver, deployment)
        except Exception:
            if context is not None:  # its KV may still be pinned, unpulled: free it now, not at its TTL
                self._in_background(self._stop(context.worker, context.worker_id))
            raise
        finally:
            if context is not None:
                self._handoffs[context.worker] -= 1
        self.stats.generation_phase_seconds += time.monotonic() - generation_started

    def _in_background(self, work) -> None:
        """Run a coroutine without making the client wait for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _context_phase(self, request, request_id: str, inputs, prompt: list[int],
                             deployment: Deployment) -> ContextResult | None:
        tried: set[Worker] = set()
        for attempt in range(2):
            try:
                worker = self.context_router.choose(prompt, frozenset(tried))
            except NoWorkerError:
                return None
            tried.add(worker)
            if attempt:
                self.stats.context_retries += 1
            worker_id = f"{request_id}-ctx{attempt}"
            self.context_router.started(worker, len(prompt))
            try:
                opening = self._open(worker, worker_id, inputs, CONTEXT_OUTPUTS, deployment.context_timeout_s)
                stream = await unless_cancelled(request, opening)
                responses = []
                while (outputs := await unless_cancelled(
                        request, stream.next(deployment.context_timeout_s))) is not None:
                    responses.append(outputs)
            except ClientCancelled:
                self.stats.cancelled += 1
                await self._stop(worker, worker_id)
                raise
            except ClientError:
                raise
            except Exception as error:  # noqa: BLE001 - failed, unreachable or timed out: try elsewhere
                logger.warning("context instance %s failed (%r); %s", worker, error,
                               "retrying elsewhere" if attempt == 0 else "prefilling on the generation instance")
                await self._abandon(worker, worker_id, error)
                continue
            finally:
                self.context_router.finished(worker, len(prompt))
            outputs = triton_io.joined_outputs(responses)
            params = outputs.get("context_phase_params")
            return ContextResult(outputs, params.reshape(-1) if params is not None and params.size else None, worker,
                                 worker_id)
        return None

    async def _generation_phase(self, request, request_id, inputs, prompt, max_tokens, deliver,
                                deployment: Deployment) -> None:
        load = len(prompt) + max_tokens
        tried: set[Worker] = set()
        for attempt in range(2):
            # An instance marked unhealthy is still better than failing the request outright.
            worker = self.generation_router.choose(prompt, frozenset(tried), allow_unhealthy=True)
            tried.add(worker)
            worker_id = f"{request_id}-gen{attempt}"
            received = False
            self.generation_router.started(worker, load)
            try:
                # A busy generation instance queues the request: its first answer may take as long as any.
                opening = self._open(worker, worker_id, inputs, WORKER_OUTPUTS, deployment.generation_timeout_s)
                stream = await unless_cancelled(request, opening)
                while True:
                    if request.is_cancelled():
                        raise ClientCancelled("the request was cancelled by the client")
                    try:
                        outputs = await unless_cancelled(request, stream.next(deployment.generation_timeout_s))
                    except asyncio.TimeoutError:
                        raise WorkerFailed(f"generation instance {worker} sent nothing for "
                                           f"{deployment.generation_timeout_s} s") from None
                    if outputs is None:
                        deliver({}, True)
                        return
                    received = True
                    deliver(outputs, False)
            except ClientCancelled:
                self.stats.cancelled += 1
                await self._stop(worker, worker_id)
                raise
            except (ClientError, RequestAbortedError):
                raise
            except Exception as error:  # noqa: BLE001 - before its first token, another instance may take it
                await self._abandon(worker, worker_id, error)
                if received or attempt or len(self.generation_router.workers) <= 1:
                    raise
                logger.warning("generation instance %s failed before its first token (%r); retrying elsewhere",
                               worker, error)
            finally:
                self.generation_router.finished(worker, load)

    async def _open(self, worker: Worker, worker_id: str, inputs: dict[str, np.ndarray], outputs: list[str],
                    timeout: float) -> WorkerStream:
        """Start a worker request on a worker; the stream's `next` gives its responses."""
        if worker.url is not None:
            return self.remote.open(worker.url, worker.model_name, worker.version, worker_id, inputs, outputs)
        inner = pb_utils.InferenceRequest(
            model_name=worker.model_name,
            model_version=worker.version,
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
            requested_output_names=outputs,
            request_id=worker_id,
        )
        # Submitting returns with the request's first response, so it waits like every response.
        generation = self._stub_generations.get(worker, 0)
        wait = functools.partial(self._wait_while_alive, worker, generation)
        try:
            iterator = await wait(held(asyncio.ensure_future(inner.async_exec(decoupled=True))), timeout)
        except asyncio.TimeoutError:
            raise WorkerFailed(f"{worker} did not answer within {timeout:g} s") from None
        return LocalStream(iterator, self._executor, worker, wait, stub_lived=lambda: (
            self._stub_generations.get(worker, 0) == generation and self.watch.stub_running(worker)),
            stub_lost=functools.partial(self._stub_lost, worker, generation))

    async def _wait_while_alive(self, worker: Worker, generation: int, future: asyncio.Future, timeout: float):
        """`future`'s result within `timeout`, checking the worker's stub process whenever the wait
        has lasted CHECK_STUB_AFTER_S; raises StubDied as soon as the process is gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(CHECK_STUB_AFTER_S, deadline - loop.time()))
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    raise
            if self._stub_generations.get(worker, 0) != generation or not self.watch.stub_running(worker):
                self._stub_lost(worker, generation)
                raise StubDied(f"{worker}: its stub process died while the request ran there")

    async def _stop_local(self, worker: Worker, worker_id: str) -> None:
        stop = pb_utils.InferenceRequest(
            model_name=worker.model_name,
            model_version=worker.version,
            inputs=[pb_utils.Tensor("input_ids", np.zeros(1, np.int32)), pb_utils.Tensor("stop", np.array([True]))],
            requested_output_names=[],
            request_id=worker_id,
        )
        lost = functools.partial(self._stub_lost, worker, self._stub_generations.get(worker, 0))
        submitting = held(asyncio.ensure_future(stop.async_exec(decoupled=True)))
        submitted = await asyncio.wait_for(asyncio.shield(submitting), STOP_TIMEOUT_S)
        await LocalStream(submitted, self._executor, worker, stub_lost=lost).next(STOP_TIMEOUT_S)

    def stub_replaced(self, worker: Worker) -> None:
        """The stub of a local worker died or was replaced: requests opened before run on a dead one."""
        self._stub_generations[worker] = self._stub_generations.get(worker, 0) + 1

    def _stub_lost(self, worker: Worker, generation: int) -> None:
        """A request found the stub it ran on dead, or Triton gave up on it ("not healthy": it stopped
        answering for a second). Either way the instance is reloaded, and the old stub, if its process
        lives, is killed first (StubRecovery): Triton has failed and freed the requests it had queued
        for it, and a frozen stub that resumes reads that freed shared memory and takes the server
        down with it (seen with 2.51). Reported once per stub: a later generation is another stub."""
        if self._stub_generations.get(worker, 0) == generation:
            self.stub_replaced(worker)
            self.watch.stub_died(worker)

    async def _abandon(self, worker: Worker, worker_id: str, error: Exception) -> None:
        """After a failed call: an unreachable server leaves rotation, a live instance is told to stop
        (a lost stub was reported by the stream that found out, and is being replaced)."""
        if isinstance(error, WorkerUnreachable):
            self.watch.unreachable(worker)
        elif not isinstance(error, StubDied):
            await self._stop(worker, worker_id)

    async def _stop(self, worker: Worker, worker_id: str) -> None:
        """Ask an instance to abort a request it may still be running (its KV is freed)."""
        try:
            if worker.url is not None:
                await asyncio.wait_for(
                    self.remote.stop(worker.url, worker.model_name, worker.version, worker_id, STOP_TIMEOUT_S),
                    2 * STOP_TIMEOUT_S)
                return
            await self._stop_local(worker, worker_id)
        except Exception:  # noqa: BLE001 - a dead instance has nothing left to stop
            logger.info("could not stop %s on %s", worker_id, worker)
