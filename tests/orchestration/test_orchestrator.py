"""The orchestrator's request path without a server: routing, retries, the fallback to local prefill,
cancellation and the stops that free KV, against scripted instances (pb_utils_stand_in)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from python_backend_utils.orchestration.deployment import Deployment, WorkerGroup
from python_backend_utils.orchestration.orchestrator import Orchestrator
from python_backend_utils.orchestration.routing import Worker
from tests import pb_utils_stand_in as pb_utils

PROMPT = list(range(100, 120))
FIRST = 7
REST = [8, 9, 10]


class Instance:
    """A scripted instance: records the requests and stops it is sent, answers with `answer`."""

    def __init__(self, answer: Callable[[pb_utils.InferenceRequest], Iterator[pb_utils.InferenceResponse]]) -> None:
        self.answer = answer
        self.requests: list[pb_utils.InferenceRequest] = []
        self.stops: list[str] = []

    def __call__(self, request: pb_utils.InferenceRequest) -> Iterator[pb_utils.InferenceResponse]:
        if "stop" in request.inputs:
            self.stops.append(request.request_id)
            return iter(())
        self.requests.append(request)
        return self.answer(request)


def outputs(**arrays) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.asarray(a)) for name, a in arrays.items()])


def prefills(request: pb_utils.InferenceRequest) -> Iterator[pb_utils.InferenceResponse]:
    yield outputs(output_ids=np.array([FIRST], np.int32), output_log_probs=np.array([-0.5], np.float32),
                  context_phase_params=np.array([f"kv of {request.request_id}".encode()], dtype=object))


def generates(request: pb_utils.InferenceRequest, pause_s: float = 0.0) -> Iterator[pb_utils.InferenceResponse]:
    local = "context_phase_params" not in request.inputs  # prefilled here: its first token is this instance's
    for token in ([FIRST] if local else []) + REST:
        time.sleep(pause_s)
        yield outputs(output_ids=np.array([token], np.int32), output_log_probs=np.array([-0.25], np.float32))


def fails(message: str, code: int = pb_utils.TritonError.INTERNAL):
    def answer(request: pb_utils.InferenceRequest) -> Iterator[pb_utils.InferenceResponse]:
        yield pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
    return answer


class Watch:
    """The orchestrator's InstanceWatch, recording what it is told."""

    def __init__(self) -> None:
        self.unreachable_workers: list[Worker] = []
        self.dead_stubs: list[Worker] = []

    def unreachable(self, worker: Worker) -> None:
        self.unreachable_workers.append(worker)

    def stub_died(self, worker: Worker) -> None:
        self.dead_stubs.append(worker)

    def stub_running(self, worker: Worker) -> bool:
        return True


def client_request(prompt: list[int] = PROMPT, cancel_after_tokens: int | None = None) -> pb_utils.ClientRequest:
    return pb_utils.ClientRequest({"input_ids": np.array(prompt, np.int32), "request_output_len": np.array([16], np.int32),
                                   "streaming": np.array([True]), "exclude_input_in_output": np.array([True])},
                                  cancel_after_tokens=cancel_after_tokens)


@pytest.fixture
def instances():
    pb_utils.instances.clear()
    yield pb_utils.instances
    pb_utils.instances.clear()


@pytest.fixture
def loop():
    """One event loop for the test, as the BLS stub has one for its life (asyncio.run would shut down
    the executor the orchestrator makes the loop's default)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def deploy(instances, contexts: list[Instance], generations: list[Instance], **settings) -> Orchestrator:
    for version, instance in enumerate(contexts, 1):
        instances[("context", version)] = instance
    for version, instance in enumerate(generations, 1):
        instances[("generation", version)] = instance
    deployment = Deployment(WorkerGroup("context", len(contexts)), WorkerGroup("generation", len(generations)),
                            **settings)
    return Orchestrator(deployment, 16, Watch(), max_requests_in_flight=4)


def serve(loop: asyncio.AbstractEventLoop, orchestrator: Orchestrator, request: pb_utils.ClientRequest) -> None:
    async def run() -> None:
        await orchestrator.serve(request)
        while orchestrator._background:  # the stops it sends without making the client wait
            await asyncio.sleep(0.01)
    loop.run_until_complete(run())


def test_the_context_instance_prefills_and_the_generation_instance_pulls_its_kv(instances, loop):
    context, generation = Instance(prefills), Instance(generates)
    orchestrator = deploy(instances, [context], [generation])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, *REST] and request.sender.error() is None
    [prefill], [decode] = context.requests, generation.requests
    assert decode.inputs["context_phase_params"].tolist() == [f"kv of {prefill.request_id}".encode()]
    assert decode.inputs["input_ids"].tolist() == PROMPT
    assert orchestrator.stats.disaggregated == 1 and not context.stops and not generation.stops


def test_round_robin_spreads_requests_over_the_instances(instances, loop):
    contexts = [Instance(prefills), Instance(prefills)]
    generations = [Instance(generates), Instance(generates)]
    orchestrator = deploy(instances, contexts, generations)
    for _ in range(4):
        serve(loop, orchestrator, client_request())
    assert [len(c.requests) for c in contexts] == [2, 2] and [len(g.requests) for g in generations] == [2, 2]


def test_a_failed_context_instance_is_stopped_and_the_request_retried_on_another(instances, loop):
    broken, healthy = Instance(fails("out of memory")), Instance(prefills)
    orchestrator = deploy(instances, [broken, healthy], [Instance(generates)])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, *REST]
    assert len(broken.requests) == len(healthy.requests) == 1
    assert broken.stops == [broken.requests[0].request_id]  # whatever it holds is freed
    assert orchestrator.stats.context_retries == 1 and orchestrator.stats.context_fallbacks == 0


def test_when_every_context_instance_fails_the_generation_instance_prefills(instances, loop):
    generation = Instance(generates)
    orchestrator = deploy(instances, [Instance(fails("a")), Instance(fails("b"))], [generation])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, *REST] and request.sender.error() is None
    assert "context_phase_params" not in generation.requests[0].inputs
    assert orchestrator.stats.context_fallbacks == 1 and orchestrator.stats.disaggregated == 0


def test_a_short_prompt_goes_straight_to_the_generation_instance(instances, loop):
    context, generation = Instance(prefills), Instance(generates)
    orchestrator = deploy(instances, [context], [generation], min_disaggregated_prompt_tokens=64)
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, *REST] and not context.requests
    assert orchestrator.stats.local_prefill == 1


def test_a_clients_mistake_is_its_error_and_is_not_retried(instances, loop):
    first, second = Instance(fails("max_tokens is too large", pb_utils.TritonError.INVALID_ARG)), Instance(prefills)
    generation = Instance(generates)
    orchestrator = deploy(instances, [first, second], [generation])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.error().code() == pb_utils.TritonError.INVALID_ARG
    assert "max_tokens" in request.sender.error().message()
    assert not second.requests and not generation.requests


def test_a_generation_failure_before_its_first_token_is_retried_on_another_instance(instances, loop):
    context, broken, healthy = Instance(prefills), Instance(fails("engine died")), Instance(generates)
    orchestrator = deploy(instances, [context], [broken, healthy])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, *REST] and request.sender.error() is None
    assert broken.stops == [broken.requests[0].request_id] and len(healthy.requests) == 1
    # the retry pulls the same KV: the context instance keeps it until then
    assert healthy.requests[0].inputs["context_phase_params"].tolist() == \
        broken.requests[0].inputs["context_phase_params"].tolist() and not context.stops


def test_a_generation_failure_after_tokens_fails_the_request_and_frees_the_context_kv(instances, loop):
    def dies_midway(request):
        yield from list(generates(request))[:1]
        yield pb_utils.InferenceResponse(error=pb_utils.TritonError("engine died"))

    context, generation, spare = Instance(prefills), Instance(dies_midway), Instance(generates)
    orchestrator = deploy(instances, [context], [generation, spare])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, REST[0]]  # what was sent stays sent: no retry after tokens
    assert "engine died" in request.sender.error().message() and not spare.requests
    assert context.stops == [context.requests[0].request_id]


def test_a_cancelled_stream_stops_its_generation_and_frees_the_context_kv(instances, loop):
    context, generation = Instance(prefills), Instance(lambda r: generates(r, pause_s=0.2))
    orchestrator = deploy(instances, [context], [generation])
    request = client_request(cancel_after_tokens=2)
    serve(loop, orchestrator, request)
    assert request.sender.error().code() == pb_utils.TritonError.CANCELLED
    assert len(request.sender.tokens()) < 1 + len(REST)
    assert generation.stops == [generation.requests[0].request_id]
    assert context.stops == [context.requests[0].request_id]
    assert orchestrator.stats.cancelled == 1


def test_a_request_queued_on_a_silent_instance_is_cancelled_while_it_waits(instances, loop):
    started = threading.Event()

    def queued(request):
        started.set()
        time.sleep(3)  # a busy instance: its first answer would come late
        yield from generates(request)

    context, generation = Instance(prefills), Instance(queued)
    orchestrator = deploy(instances, [context], [generation])
    request = client_request()
    threading.Thread(target=lambda: started.wait(5) and request.sender.cancelled.set(), daemon=True).start()
    began = time.monotonic()
    serve(loop, orchestrator, request)
    assert started.is_set() and time.monotonic() - began < 2.5  # not when the instance answers, 3 s on
    assert request.sender.error().code() == pb_utils.TritonError.CANCELLED
    assert generation.stops == [generation.requests[0].request_id]


def test_an_instance_whose_stub_triton_gave_up_on_is_reported_and_sent_nothing_more(instances, loop):
    dead = "Stub process 'context_0_0' is not healthy."
    broken, healthy = Instance(fails(dead)), Instance(prefills)
    orchestrator = deploy(instances, [broken, healthy], [Instance(generates)])
    request = client_request()
    serve(loop, orchestrator, request)
    assert request.sender.tokens() == [FIRST, *REST]
    assert orchestrator.watch.dead_stubs == [Worker("context", 1)]
    assert not broken.stops  # never send anything more to a stub that stopped answering


def test_past_the_admission_limit_a_request_is_refused_as_unavailable(instances, loop):
    release = threading.Event()

    def held_open(request):
        release.wait(10)
        yield from generates(request)

    orchestrator = deploy(instances, [Instance(prefills)], [Instance(held_open)])

    async def run() -> list[pb_utils.ClientRequest]:
        requests = [client_request() for _ in range(5)]
        first_four = [asyncio.ensure_future(orchestrator.serve(r)) for r in requests[:4]]
        await asyncio.sleep(0.3)
        await orchestrator.serve(requests[4])  # answered at once
        release.set()
        await asyncio.gather(*first_four)
        return requests

    requests = loop.run_until_complete(run())
    assert requests[4].sender.error().code() == pb_utils.TritonError.UNAVAILABLE
    assert all(r.sender.tokens() == [FIRST, *REST] for r in requests[:4])
