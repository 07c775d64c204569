"""Routers: which instance of a server group takes the next request.

The orchestrator is the only way requests reach the instances, so it knows their load
exactly (what it has sent and not yet seen finish) and which prompts it sent where; the
KV-cache-aware router uses the latter as its picture of each instance's prefix cache.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

from python_backend_utils.orchestration.deployment import RouterConfig
from python_backend_utils.prefix_hashing import prefix_hashes


@dataclass(frozen=True)
class Worker:
    """One instance: a version of a model, on this server (url None) or on the server at `url`."""

    model_name: str
    version: int
    url: str | None = None

    def __str__(self) -> str:
        where = f"@{self.url}" if self.url else ""
        return f"{self.model_name}/{self.version}{where}"


class NoWorkerError(RuntimeError):
    """Every instance is excluded (all failed for this request) or out of rotation."""


@dataclass
class _Load:
    requests: int = 0
    tokens: int = 0


class Router:
    """Round robin; subclasses override `_pick`. Load is tracked for every policy (it is a metric too).

    Membership changes at runtime: `set_workers` puts new workers in rotation at once and takes
    removed ones out, while `finished` keeps counting the requests they still run (they drain:
    `draining` lists them until their last request ends). `set_healthy` takes a worker out of
    rotation and back. The orchestrator routes on its event loop while membership and health
    change on another thread, hence the lock.
    """

    def __init__(self, workers: list[Worker], config: RouterConfig) -> None:
        if not workers:
            raise ValueError("a router needs at least one worker")
        self.workers: list[Worker] = []
        self.config = config
        self.load: dict[Worker, _Load] = {}
        self.decisions: dict[Worker, int] = {}
        self.unhealthy: set[Worker] = set()
        self._cycle = itertools.count()
        self._lock = threading.Lock()
        self.set_workers(workers)

    def choose(
        self, prompt_ids: list[int], exclude: frozenset[Worker] = frozenset(), *, allow_unhealthy: bool = False
    ) -> Worker:
        """A worker in rotation; with `allow_unhealthy`, an unhealthy one when no healthy one is left."""
        with self._lock:
            candidates = [t for t in self.workers if t not in exclude]
            healthy = [t for t in candidates if t not in self.unhealthy]
            if healthy or not allow_unhealthy:
                candidates = healthy
            if not candidates:
                out = ", ".join(map(str, sorted(exclude | self.unhealthy, key=str))) or "none"
                raise NoWorkerError(f"no instance left to try (failed or unhealthy: {out})")
            worker = self._pick(candidates, prompt_ids)
            self.decisions[worker] += 1
            return worker

    def started(self, worker: Worker, num_tokens: int) -> None:
        with self._lock:
            load = self.load[worker]
            load.requests += 1
            load.tokens += num_tokens

    def finished(self, worker: Worker, num_tokens: int) -> None:
        with self._lock:
            load = self.load[worker]
            load.requests -= 1
            load.tokens -= num_tokens
            if load.requests == 0 and worker not in self.workers:
                self._forget(worker)  # its last request after removal: drained

    def set_workers(self, workers: list[Worker]) -> None:
        """The new membership; workers that stay keep their load, statistics and health."""
        with self._lock:
            self.workers = list(dict.fromkeys(workers))
            for worker in self.workers:
                self.load.setdefault(worker, _Load())
                self.decisions.setdefault(worker, 0)
                self._added(worker)
            for worker in [t for t in self.load if t not in self.workers and self.load[t].requests == 0]:
                self._forget(worker)

    def set_healthy(self, worker: Worker, healthy: bool) -> None:
        with self._lock:
            if healthy:
                self.unhealthy.discard(worker)
            elif worker in self.load:
                self.unhealthy.add(worker)

    def adopt(self, previous: Router) -> None:
        """Take over another router's state (a policy change at runtime): in-flight requests end here."""
        with previous._lock, self._lock:
            for worker, load in previous.load.items():
                self.load[worker] = load
                self.decisions[worker] = previous.decisions.get(worker, 0)
            self.unhealthy = {t for t in previous.unhealthy if t in self.load}
            for worker in [t for t in self.load if t not in self.workers and self.load[t].requests == 0]:
                self._forget(worker)

    @property
    def draining(self) -> list[Worker]:
        """Removed workers that still run requests."""
        with self._lock:
            return [t for t in self.load if t not in self.workers]

    def snapshot(self) -> dict[Worker, tuple[bool, bool, int, int]]:
        """Every known worker: (in rotation, healthy, requests in flight, decisions)."""
        with self._lock:
            return {t: (t in self.workers, t not in self.unhealthy, self.load[t].requests, self.decisions[t])
                    for t in self.load}

    def _added(self, worker: Worker) -> None:
        """Hook for per-worker state of a policy."""

    def _forget(self, worker: Worker) -> None:
        del self.load[worker]
        del self.decisions[worker]
        self.unhealthy.discard(worker)

    def _load_of(self, worker: Worker) -> int:
        load = self.load[worker]
        return load.tokens if self.config.load_metric == "tokens" else load.requests

    def _pick(self, candidates: list[Worker], prompt_ids: list[int]) -> Worker:
        return candidates[next(self._cycle) % len(candidates)]


class LoadBalancingRouter(Router):
    def _pick(self, candidates: list[Worker], prompt_ids: list[int]) -> Worker:
        lightest = min(self._load_of(t) for t in candidates)
        tied = [t for t in candidates if self._load_of(t) == lightest]
        return tied[next(self._cycle) % len(tied)]


class KvCacheAwareRouter(Router):
    """Prefer the instance that already holds the longest prefix of the prompt, weighed against load.

    Both sides are prefill work in tokens: score = cached prompt tokens * cache_weight - prompt
    tokens in flight there. The block hashes are the engine's own chain (`prefix_hashes`), so a
    match here is a match in the instance's block manager as long as it has not evicted the
    blocks (the index forgets the oldest beyond `capacity_blocks`).
    """

    def __init__(
        self, workers: list[Worker], config: RouterConfig, block_size: int, capacity_blocks: int = 4096
    ) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._cached: dict[Worker, OrderedDict[int, None]] = {}
        super().__init__(workers, config)

    def _added(self, worker: Worker) -> None:
        self._cached.setdefault(worker, OrderedDict())

    def _forget(self, worker: Worker) -> None:
        super()._forget(worker)
        self._cached.pop(worker, None)

    def cached_tokens(self, worker: Worker, hashes: list[int]) -> int:
        index, matched = self._cached[worker], 0
        for block in hashes:
            if block not in index:
                break
            matched += 1
        return matched * self.block_size

    def _pick(self, candidates: list[Worker], prompt_ids: list[int]) -> Worker:
        hashes = prefix_hashes(prompt_ids, self.block_size)
        scores = {
            t: self.cached_tokens(t, hashes) * self.config.cache_weight - self.load[t].tokens for t in candidates
        }
        best = max(scores.values())
        tied = [t for t in candidates if scores[t] == best]
        worker = tied[next(self._cycle) % len(tied)]
        self._remember(worker, hashes)
        return worker

    def _remember(self, worker: Worker, hashes: list[int]) -> None:
        index = self._cached[worker]
        for block in hashes:
            index[block] = None
            index.move_to_end(block)
        while len(index) > self.capacity_blocks:
            index.popitem(last=False)


def make_router(workers: list[Worker], config: RouterConfig, block_size: int = 16) -> Router:
    if config.type == "load_balancing":
        return LoadBalancingRouter(workers, config)
    if config.type == "kv_cache_aware":
        return KvCacheAwareRouter(workers, config, block_size)
    return Router(workers, config)
