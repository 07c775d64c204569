"""The deployment file: which context and generation instances exist and how requests reach them.

Shaped like TensorRT-LLM's `disagg_config.yaml`. Instances of one server are addressed as
versions of the `context` / `generation` models (version i+1 is instance i), so a router can
pick an exact instance through BLS while every instance shares one config.pbtxt. Instances on
other servers are listed as `urls`: each is the gRPC endpoint `host:port` of a tritonserver
serving the group's model, optionally `host:port/V` for version V of it (default 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROUTER_TYPES = ("round_robin", "load_balancing", "kv_cache_aware")
# A DNS name or IPv4 address, or a bracketed IPv6 address; a port; an optional model version.
_URL = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                  r":(?P<port>\d{1,5})(?:/(?P<version>\d+))?$")


class DeploymentError(ValueError):
    """The deployment file is malformed; the message names the key to fix."""


@dataclass(frozen=True)
class RemoteAddress:
    """One url of a group: the model's version `version` on the tritonserver at `endpoint`."""

    endpoint: str  # host:port, the form tritonclient takes
    version: int


def parse_url(url: object, where: str) -> RemoteAddress:
    if not isinstance(url, str):
        raise DeploymentError(f"{where}: {url!r} is not a string; write host:port (e.g. ctx-0:8001)")
    match = _URL.match(url.strip())
    if match is None:
        raise DeploymentError(f"{where}: {url!r} is not host:port or host:port/version (e.g. ctx-0:8001)")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise DeploymentError(f"{where}: {url!r} has port {port}, outside 1-65535")
    version = int(match["version"] or 1)
    if version < 1:
        raise DeploymentError(f"{where}: {url!r} names version {version}; versions start at 1")
    return RemoteAddress(f"{match['host']}:{port}", version)


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
class WorkerGroup:
    model_name: str
    num_instances: int = 1  # versions of the model on this server
    router: RouterConfig = field(default_factory=RouterConfig)
    urls: tuple[str, ...] = ()  # the same model on other servers

    def __post_init__(self) -> None:
        where = f"{self.model_name}_servers"
        if self.num_instances < 0:
            raise DeploymentError(f"{where}.num_instances must be 0 or more, got {self.num_instances}")
        addresses = [parse_url(url, f"{where}.urls") for url in self.urls]
        if len(set(addresses)) != len(addresses):
            raise DeploymentError(f"{where}.urls lists the same instance twice: {list(self.urls)}")
        if self.num_instances == 0 and not addresses:
            raise DeploymentError(f"{where}: no instance; set num_instances to 1 or more, or list urls")

    @property
    def remote(self) -> list[RemoteAddress]:
        return [parse_url(url, f"{self.model_name}_servers.urls") for url in self.urls]


@dataclass(frozen=True)
class Deployment:
    context_servers: WorkerGroup = field(default_factory=lambda: WorkerGroup("context"))
    generation_servers: WorkerGroup = field(default_factory=lambda: WorkerGroup("generation"))
    # Prompts shorter than this many tokens skip the context instance (0: always disaggregate).
    min_disaggregated_prompt_tokens: int = 0
    context_timeout_s: float = 60.0
    generation_timeout_s: float = 600.0
    # Remote instances: how often each is asked whether it is ready, how long an answer may take,
    # and how many failed checks in a row take it out of rotation (one passed check puts it back).
    health_check_interval_s: float = 5.0
    health_check_timeout_s: float = 2.0
    health_check_failures: int = 2
    # How often the orchestrator looks for edits of this file (0: never, the file is read once).
    watch_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("context_timeout_s", "generation_timeout_s", "health_check_interval_s", "health_check_timeout_s"):
            if not getattr(self, name) > 0:
                raise DeploymentError(f"{name} must be above 0, got {getattr(self, name)}")
        if self.watch_interval_s < 0:
            raise DeploymentError(f"watch_interval_s must be 0 (off) or more, got {self.watch_interval_s}")
        if self.health_check_failures < 1:
            raise DeploymentError(f"health_check_failures must be at least 1, got {self.health_check_failures}")
        if self.min_disaggregated_prompt_tokens < 0:
            raise DeploymentError("min_disaggregated_prompt_tokens must be 0 or more")

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        with open(path) as handle:
            return cls.from_text(handle.read())

    @classmethod
    def from_text(cls, text: str) -> Deployment:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DeploymentError(f"not valid YAML: {error}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise DeploymentError(f"the deployment file must be a mapping of keys, got {type(raw).__name__}")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> Deployment:
        settings = {"min_disaggregated_prompt_tokens": int, "context_timeout_s": float, "generation_timeout_s": float,
                    "health_check_interval_s": float, "health_check_timeout_s": float,
                    "health_check_failures": int, "watch_interval_s": float}
        # hostname, port and backend belong to the seed's format; the orchestrator has no use for them.
        known = {"context_servers", "generation_servers", "hostname", "port", "backend", *settings}
        unknown = set(raw) - known
        if unknown:
            raise DeploymentError(f"unknown keys in the deployment file: {sorted(unknown)}")
        values = {}
        for key, kind in settings.items():
            if key in raw:
                try:
                    values[key] = kind(raw[key])
                except (TypeError, ValueError):
                    raise DeploymentError(f"{key}={raw[key]!r} is not a number") from None
        return cls(
            context_servers=_group("context", {} if raw.get("context_servers") is None else raw["context_servers"]),
            generation_servers=_group("generation",
                                      {} if raw.get("generation_servers") is None else raw["generation_servers"]),
            **values,
        )


def _group(model_name: str, raw: dict) -> WorkerGroup:
    if not isinstance(raw, dict):
        raise DeploymentError(f"{model_name}_servers must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"num_instances", "router", "urls", "model_name"}
    if unknown:
        raise DeploymentError(f"unknown keys under {model_name}_servers: {sorted(unknown)}")
    router_raw = raw.get("router") or {}
    try:
        router = RouterConfig(**router_raw)
    except TypeError as error:
        raise DeploymentError(f"{model_name}_servers.router: {error}") from None
    urls = raw.get("urls") or []
    if not isinstance(urls, list):
        raise DeploymentError(f"{model_name}_servers.urls must be a list of host:port, got {urls!r}")
    # With urls and no num_instances, every instance is remote: an orchestrator-only server.
    default_instances = 0 if urls else 1
    try:
        num_instances = int(raw.get("num_instances", default_instances))
    except (TypeError, ValueError):
        raise DeploymentError(f"{model_name}_servers.num_instances={raw['num_instances']!r} is not a number") from None
    return WorkerGroup(
        model_name=raw.get("model_name", model_name),
        num_instances=num_instances,
        router=router,
        urls=tuple(urls),
    )
