"""The deployment file: which context and generation instances exist and how requests reach them.

Shaped like TensorRT-LLM's `disagg_config.yaml`. Instances of one server are addressed as
versions of the `context` / `generation` models (version i+1 is instance i), so a router can
pick an exact instance through BLS while every instance shares one config.pbtxt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROUTER_TYPES = ("round_robin", "load_balancing", "kv_cache_aware")


class DeploymentError(ValueError):
    """The deployment file is malformed; the message names the key to fix."""


@dataclass(frozen=True)
class RouterConfig:
    type: str = "round_robin"
    # load_balancing / kv_cache_aware: what "load" counts, active requests or their tokens.
    load_metric: str = "tokens"
    # kv_cache_aware: how many prompt tokens a cached token outweighs in the load comparison.
    cache_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ROUTER_TYPES:
            raise DeploymentError(f"router.type={self.type!r}: choose one of {', '.join(ROUTER_TYPES)}")
        if self.load_metric not in ("requests", "tokens"):
            raise DeploymentError(f"router.load_metric={self.load_metric!r}: choose requests or tokens")


@dataclass(frozen=True)
class ServerGroup:
    model_name: str
    num_instances: int = 1
    router: RouterConfig = field(default_factory=RouterConfig)
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise DeploymentError(f"{self.model_name}: num_instances must be at least 1")


@dataclass(frozen=True)
class Deployment:
    context_servers: ServerGroup = field(default_factory=lambda: ServerGroup("context"))
    generation_servers: ServerGroup = field(default_factory=lambda: ServerGroup("generation"))
    # Prompts shorter than this many tokens skip the context instance (0: always disaggregate).
    min_disaggregated_prompt_tokens: int = 0
    context_timeout_s: float = 60.0
    generation_timeout_s: float = 600.0

    @classmethod
    def load(cls, path: str | Path) -> "Deployment":
        with open(path) as handle:
            return cls.from_dict(yaml.safe_load(handle) or {})

    @classmethod
    def from_dict(cls, raw: dict) -> "Deployment":
        known = {"context_servers", "generation_servers", "min_disaggregated_prompt_tokens",
                 "context_timeout_s", "generation_timeout_s", "hostname", "port", "backend"}
        unknown = set(raw) - known
        if unknown:
            raise DeploymentError(f"unknown keys in the deployment file: {sorted(unknown)}")
        values = {k: v for k, v in raw.items() if k in known - {"context_servers", "generation_servers",
                                                                  "hostname", "port", "backend"}}
        return cls(
            context_servers=_group("context", raw.get("context_servers") or {}),
            generation_servers=_group("generation", raw.get("generation_servers") or {}),
            **values,
        )


def _group(model_name: str, raw: dict) -> ServerGroup:
    unknown = set(raw) - {"num_instances", "router", "urls", "model_name"}
    if unknown:
        raise DeploymentError(f"unknown keys under {model_name}_servers: {sorted(unknown)}")
    router_raw = raw.get("router") or {}
    try:
        router = RouterConfig(**router_raw)
    except TypeError as error:
        raise DeploymentError(f"{model_name}_servers.router: {error}") from None
    return ServerGroup(
        model_name=raw.get("model_name", model_name),
        num_instances=int(raw.get("num_instances", 1)),
        router=router,
        urls=tuple(raw.get("urls") or ()),
    )
