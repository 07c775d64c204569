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
class Target:
    """One instance: a version of a model, on this server (url None) or on the server at `url`."""

    model_name: str
    version: int
    url: str | None = None

    def __str__(self) -> str:
        where = f"@{self.url}" if self.url else ""
        return f"{self.model_name}/{self.version}{where}"


class NoTargetError(RuntimeError):
    """Every instance is excluded (all failed for this request) or out of rotation."""


@dataclass
class _Load:
    requests: int = 0
    tokens: int = 0


class Router:
    """Round robin; subclasses override `_pick`. Load is tracked for every policy (it is a metric too).

    Membership changes at runtime: `set_targets` puts new targets in rotation at once and takes
    removed ones out, while `finished` keeps counting the requests they still run (they drain:
    `draining` lists them until their last request ends). `set_healthy` takes a target out of
    rotation and back. The orchestrator routes on its event loop while membership and health
    change on another thread, hence the lock.
    """

    def __init__(self, targets: list[Target], config: RouterConfig) -> None:
        if not targets:
            raise ValueError("a router needs at least one target")
        self.targets: list[Target] = []
        self.config = config
        self.load: dict[Target, _Load] = {}
        self.decisions: dict[Target, int] = {}
        self.unhealthy: set[Target] = set()
        self._cycle = itertools.count()
        self._lock = threading.Lock()
        self.set_targets(targets)

    def choose(
        self, prompt_ids: list[int], exclude: frozenset[Target] = frozenset(), *, allow_unhealthy: bool = False
    ) -> Target:
        """A target in rotation; with `allow_unhealthy`, an unhealthy one when no healthy one is left."""
        with self._lock:
            candidates = [t for t in self.targets if t not in exclude]
            healthy = [t for t in candidates if t not in self.unhealthy]
            if healthy or not allow_unhealthy:
                candidates = healthy
            if not candidates:
                out = ", ".join(map(str, sorted(exclude | self.unhealthy, key=str))) or "none"
                raise NoTargetError(f"no instance left to try (failed or unhealthy: {out})")
            target = self._pick(candidates, prompt_ids)
            self.decisions[target] += 1
            return target

    def started(self, target: Target, num_tokens: int) -> None:
        with self._lock:
            load = self.load[target]
            load.requests += 1
            load.tokens += num_tokens

    def finished(self, target: Target, num_tokens: int) -> None:
        with self._lock:
            load = self.load[target]
            load.requests -= 1
            load.tokens -= num_tokens
            if load.requests == 0 and target not in self.targets:
                self._forget(target)  # its last request after removal: drained

    def set_targets(self, targets: list[Target]) -> None:
        """The new membership; targets that stay keep their load, statistics and health."""
        with self._lock:
            self.targets = list(dict.fromkeys(targets))
            for target in self.targets:
                self.load.setdefault(target, _Load())
                self.decisions.setdefault(target, 0)
                self._added(target)
            for target in [t for t in self.load if t not in self.targets and self.load[t].requests == 0]:
                self._forget(target)

    def set_healthy(self, target: Target, healthy: bool) -> None:
        with self._lock:
            if healthy:
                self.unhealthy.discard(target)
            elif target in self.load:
                self.unhealthy.add(target)

    def adopt(self, previous: Router) -> None:
        """Take over another router's state (a policy change at runtime): in-flight requests end here."""
        with previous._lock, self._lock:
            for target, load in previous.load.items():
                self.load[target] = load
                self.decisions[target] = previous.decisions.get(target, 0)
            self.unhealthy = {t for t in previous.unhealthy if t in self.load}
            for target in [t for t in self.load if t not in self.targets and self.load[t].requests == 0]:
                self._forget(target)

    @property
    def draining(self) -> list[Target]:
        """Removed targets that still run requests."""
        with self._lock:
            return [t for t in self.load if t not in self.targets]

    def snapshot(self) -> dict[Target, tuple[bool, bool, int, int]]:
        """Every known target: (in rotation, healthy, requests in flight, decisions)."""
        with self._lock:
            return {t: (t in self.targets, t not in self.unhealthy, self.load[t].requests, self.decisions[t])
                    for t in self.load}

    def _added(self, target: Target) -> None:
        """Hook for per-target state of a policy."""

    def _forget(self, target: Target) -> None:
        del self.load[target]
        del self.decisions[target]
        self.unhealthy.discard(target)

    def _load_of(self, target: Target) -> int:
        load = self.load[target]
        return load.tokens if self.config.load_metric == "tokens" else load.requests

    def _pick(self, candidates: list[Target], prompt_ids: list[int]) -> Target:
        return candidates[next(self._cycle) % len(candidates)]


class LoadBalancingRouter(Router):
    def _pick(self, candidates: list[Target], prompt_ids: list[int]) -> Target:
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
        self, targets: list[Target], config: RouterConfig, block_size: int, capacity_blocks: int = 4096
    ) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._cached: dict[Target, OrderedDict[int, None]] = {}
        super().__init__(targets, config)

    def _added(self, target: Target) -> None:
        self._cached.setdefault(target, OrderedDict())

    def _forget(self, target: Target) -> None:
        super()._forget(target)
        self._cached.pop(target, None)

    def cached_tokens(self, target: Target, hashes: list[int]) -> int:
        index, matched = self._cached[target], 0
        for block in hashes:
            if block not in index:
                break
            matched += 1
        return matched * self.block_size

    def _pick(self, candidates: list[Target], prompt_ids: list[int]) -> Target:
        hashes = prefix_hashes(prompt_ids, self.block_size)
        scores = {
            t: self.cached_tokens(t, hashes) * self.config.cache_weight - self.load[t].tokens for t in candidates
        }
        best = max(scores.values())
        tied = [t for t in candidates if scores[t] == best]
        target = tied[next(self._cycle) % len(tied)]
        self._remember(target, hashes)
        return target

    def _remember(self, target: Target, hashes: list[int]) -> None:
        index = self._cached[target]
        for block in hashes:
            index[block] = None
            index.move_to_end(block)
        while len(index) > self.capacity_blocks:
            index.popitem(last=False)


def make_router(targets: list[Target], config: RouterConfig, block_size: int = 16) -> Router:
    if config.type == "load_balancing":
        return LoadBalancingRouter(targets, config)
    if config.type == "kv_cache_aware":
        return KvCacheAwareRouter(targets, config, block_size)
    return Router(targets, config)
