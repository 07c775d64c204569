"""A discrete-event simulation of a deployment: N aggregated workers, or C context + G generation.

Each worker is the engine's scheduler (python_backend_utils/engine/scheduler.py) in miniature:
every step carries one decode token per running sequence plus as many prompt tokens as
max_num_batched_tokens leaves, at most max_num_seqs sequences hold KV, a prompt is admitted only
when its KV fits, and a decode that finds the KV cache full preempts the newest sequence, which is
recomputed when it returns. Step times come from a Calibration. Requests go to workers the way
the routers send them: fewest requests in flight for aggregated instances, fewest prompt tokens
in flight for context (the KV-cache-aware router without shared prefixes), fewest tokens in flight
for generation (load_balancing, load_metric tokens). A disaggregated request's first token comes
from its context worker; the generation worker then pulls the KV over the link and decodes.
Out comes one client.metrics.RequestMeasurement per request, timed as the client would see it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from client.metrics import OK, RequestMeasurement
from planner.calibration import Calibration


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 4096


@dataclass(frozen=True)
class SimulatedDeployment:
    """Either aggregated_workers > 0, or context_workers and generation_workers both > 0."""

    aggregated_workers: int = 0
    context_workers: int = 0
    generation_workers: int = 0
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)

    def __post_init__(self) -> None:
        aggregated = self.aggregated_workers > 0 and self.context_workers == self.generation_workers == 0
        disaggregated = self.aggregated_workers == 0 and self.context_workers > 0 and self.generation_workers > 0
        if not (aggregated or disaggregated):
            raise ValueError("give aggregated_workers, or context_workers and generation_workers (not both kinds)")

    @property
    def workers(self) -> int:
        return self.aggregated_workers + self.context_workers + self.generation_workers


@dataclass(frozen=True)
class SimulatedRequest:
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"a request needs at least one prompt and one output token, not {self}")


@dataclass(frozen=True)
class Workload:
    """Requests in sending order, with their send times (open loop) or a concurrency (closed loop).

    A closed loop sends its first `concurrency` requests evenly over `ramp_s` (0: all at once).
    Requests of one length that start together finish together and stay in lockstep waves,
    which hides an aggregated worker's prefills from its decodes; a ramp spreads them out.
    """

    requests: tuple[SimulatedRequest, ...]
    arrivals_s: tuple[float, ...] | None = None
    concurrency: int | None = None
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if (self.arrivals_s is None) == (self.concurrency is None):
            raise ValueError("give exactly one of arrivals_s and concurrency")
        if self.ramp_s < 0 or (self.ramp_s > 0 and self.concurrency is None):
            raise ValueError("ramp_s is a non-negative spread of a closed loop's first requests")
        if self.arrivals_s is not None and len(self.arrivals_s) != len(self.requests):
            raise ValueError("one arrival time per request")


@dataclass
class _Sequence:
    """The engine's view of a request: its tokens so far, how many have KV, how many KV slots it holds."""

    index: int
    tokens: int  # prompt plus sampled tokens
    computed: int = 0
    reserved: int = 0
    emitted: int = 0
    needs_pull: bool = False  # on a generation worker until its prompt's KV is pulled
    awaiting_kv_until: float | None = None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time, next(self._order), action))

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


class _Worker:
    """One engine instance. `on_token(seq, time)` hears every token it produces."""

    def __init__(self, clock: _Clock, calibration: Calibration, limits: SchedulerLimits) -> None:
        self.clock, self.calibration, self.limits = clock, calibration, limits
        self.on_token: Callable[[_Sequence, float], None] = lambda seq, time: None
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.kv_used = 0
        self.busy = False
        self.in_flight: dict[int, int] = {}  # the router's picture: request index -> its tokens

    def load(self, by_tokens: bool) -> int:
        return sum(self.in_flight.values()) if by_tokens else len(self.in_flight)

    def add(self, seq: _Sequence) -> None:
        self.waiting.append(seq)
        self.kick()

    def kick(self) -> None:
        if not self.busy:
            self._step()

    def _step(self) -> None:
        now = self.clock.now
        budget = self.limits.max_num_batched_tokens
        chunks: list[tuple[_Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            if seq.awaiting_kv_until is not None:
                if seq.awaiting_kv_until > now:
                    continue
                seq.awaiting_kv_until = None
            if seq.computed == seq.tokens - 1 and not self._make_room(seq):
                continue
            count = min(seq.tokens - seq.computed, budget)
            chunks.append((seq, count))
            budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if self.kv_used + seq.tokens > self.calibration.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.kv_used += seq.tokens
            seq.reserved = seq.tokens
            self.running.append(seq)
            if seq.needs_pull:
                seq.needs_pull, seq.computed = False, seq.tokens - 1  # the prompt's KV comes over the link
                seq.awaiting_kv_until = now + self.calibration.kv_transfer_time(seq.computed)
                self.clock.at(seq.awaiting_kv_until, self.kick)
                continue
            count = min(seq.tokens - seq.computed, budget)
            chunks.append((seq, count))
            budget -= count
        self.busy = bool(chunks)
        if chunks:
            self.clock.at(now + self._step_time(chunks), lambda: self._finish_step(chunks))

    def _step_time(self, chunks: list[tuple[_Sequence, int]]) -> float:
        decodes = [seq for seq, count in chunks if count == 1 and seq.emitted > 0]
        prefills = [(seq, count) for seq, count in chunks if not (count == 1 and seq.emitted > 0)]
        return (self.calibration.decode_step_time(len(decodes), sum(seq.tokens for seq in decodes))
                + sum(self.calibration.prefill_time(count, seq.computed) for seq, count in prefills))

    def _make_room(self, seq: _Sequence) -> bool:
        """A KV slot for seq's newest token, preempting the newest sequences while the cache is full."""
        while seq.reserved < seq.tokens and self.kv_used >= self.calibration.kv_capacity_tokens:
            victim = self.running[-1]
            self.release(victim)
            victim.computed, victim.awaiting_kv_until = 0, None  # recomputed, prompt and sampled tokens, on return
            self.waiting.appendleft(victim)
            if victim is seq:
                return False
        self.kv_used += seq.tokens - seq.reserved
        seq.reserved = seq.tokens
        return True

    def release(self, seq: _Sequence) -> None:
        self.running.remove(seq)
        self.kv_used -= seq.reserved
        seq.reserved = 0

    def _finish_step(self, chunks: list[tuple[_Sequence, int]]) -> None:
        now = self.clock.now
        for seq, count in chunks:
            seq.computed += count
            if seq.computed == seq.tokens:
                seq.tokens += 1
                seq.emitted += 1
                self.on_token(seq, now)
        self.busy = False
        self._step()


def simulate(calibration: Calibration, deployment: SimulatedDeployment, workload: Workload) -> list[RequestMeasurement]:
    """Every request of the workload, as the client would measure it."""
    requests = workload.requests
    largest = max((r.input_tokens + r.output_tokens for r in requests), default=0)
    if largest > calibration.kv_capacity_tokens:
        raise ValueError(f"a request of {largest} tokens cannot fit a worker's KV cache of "
                         f"{calibration.kv_capacity_tokens} tokens (kv_capacity_tokens in the calibration)")
    clock = _Clock()
    sent_at: dict[int, float] = {}
    token_times: dict[int, list[float]] = {index: [] for index in range(len(requests))}
    next_index = itertools.count()
    tokens_of = {index: request.input_tokens + request.output_tokens for index, request in enumerate(requests)}

    def least_loaded(workers: Sequence[_Worker], by_tokens: bool) -> _Worker:
        return min(workers, key=lambda worker: worker.load(by_tokens))

    def done(seq: _Sequence, worker: _Worker, time: float) -> None:
        worker.release(seq)
        del worker.in_flight[seq.index]
        if workload.concurrency is not None:
            send(next(next_index), time)

    def token(seq: _Sequence, worker: _Worker, time: float) -> None:
        times = token_times[seq.index]
        times.append(time)
        if len(times) == requests[seq.index].output_tokens:
            done(seq, worker, time)
        elif worker in context_workers:
            worker.release(seq)
            del worker.in_flight[seq.index]
            generation = least_loaded(generation_workers, by_tokens=True)
            generation.in_flight[seq.index] = tokens_of[seq.index]
            generation.add(_Sequence(seq.index, seq.tokens, emitted=1, needs_pull=True))

    def make(count: int) -> list[_Worker]:
        workers: list[_Worker] = []
        for _ in range(count):
            worker = _Worker(clock, calibration, deployment.limits)
            worker.on_token = lambda seq, time, worker=worker: token(seq, worker, time)
            workers.append(worker)
        return workers

    aggregated_workers = make(deployment.aggregated_workers)
    context_workers = make(deployment.context_workers)
    generation_workers = make(deployment.generation_workers)

    def send(index: int, time: float) -> None:
        if index >= len(requests):
            return
        sent_at[index] = time
        request = requests[index]
        seq = _Sequence(index, request.input_tokens)
        delay = calibration.request_overhead_s
        if aggregated_workers:
            worker = least_loaded(aggregated_workers, by_tokens=False)
            worker.in_flight[index] = tokens_of[index]
        else:
            delay += calibration.disaggregated_overhead_s
            worker = least_loaded(context_workers, by_tokens=True)
            worker.in_flight[index] = request.input_tokens
        clock.at(time + delay, lambda: worker.add(seq))

    if workload.concurrency is not None:
        for k in range(workload.concurrency):
            index, start = next(next_index), workload.ramp_s * k / workload.concurrency
            clock.at(start, lambda index=index, start=start: send(index, start))
    else:
        for index, arrival in enumerate(workload.arrivals_s):
            clock.at(arrival, lambda index=index, arrival=arrival: send(index, arrival))
    clock.run()
    return [_measurement(index, request, sent_at[index], token_times[index]) for index, request in enumerate(requests)]


def _measurement(index: int, request: SimulatedRequest, sent: float, times: list[float]) -> RequestMeasurement:
    return RequestMeasurement(
        index=index, status=OK, start_s=sent, input_tokens=request.input_tokens, max_tokens=request.output_tokens,
        output_tokens=len(times), retokenized_output_tokens=len(times), ttft_s=times[0] - sent,
        e2e_s=times[-1] - sent, itl_s=tuple(later - earlier for earlier, later in zip(times, times[1:])),
    )
