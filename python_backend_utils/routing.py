"""Routers: which instance of a server group takes the next request.

The orchestrator is the only way requests reach the instances, so it knows their load
exactly (what it has sent and not yet seen finish) and which prompts it sent where; the
KV-cache-aware router uses the latter as its picture of each instance's prefix cache.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from python_backend_utils.block_manager import prefix_hashes
from python_backend_utils.deployment import RouterConfig


@dataclass(frozen=True)
class Target:
    """One instance: a version of a model, on this server (url None) or a remote one."""

    model_name: str
    version: int
    url: str | None = None

    def __str__(self) -> str:
        where = f"@{self.url}" if self.url else ""
        return f"{self.model_name}/{self.version}{where}"


class NoTargetError(RuntimeError):
    """Every instance is excluded (all failed for this request)."""


@dataclass
class _Load:
    requests: int = 0
    tokens: int = 0


class Router:
    """Round robin; subclasses override `_pick`. Load is tracked for every policy (it is a metric too)."""

    def __init__(self, targets: list[Target], config: RouterConfig) -> None:
        if not targets:
            raise ValueError("a router needs at least one target")
        self.targets = list(targets)
        self.config = config
        self.load = {target: _Load() for target in self.targets}
        self.decisions = {target: 0 for target in self.targets}
        self._cycle = itertools.count()

    def choose(self, prompt_ids: list[int], exclude: frozenset[Target] = frozenset()) -> Target:
        candidates = [t for t in self.targets if t not in exclude]
        if not candidates:
            raise NoTargetError(f"no instance left to try (excluded: {', '.join(map(str, exclude))})")
        target = self._pick(candidates, prompt_ids)
        self.decisions[target] += 1
        return target

    def started(self, target: Target, num_tokens: int) -> None:
        load = self.load[target]
        load.requests += 1
        load.tokens += num_tokens

    def finished(self, target: Target, num_tokens: int) -> None:
        load = self.load[target]
        load.requests -= 1
        load.tokens -= num_tokens

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
        super().__init__(targets, config)
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._cached: dict[Target, OrderedDict[int, None]] = {t: OrderedDict() for t in self.targets}

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
