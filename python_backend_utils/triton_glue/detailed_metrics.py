"""The metrics that reveal other clients' prompts are published only where a model asks for them.

The metrics port answers whoever reaches it. A client that reads an engine instance's prefix-cache
hits (`disagg_prefix_cache_hit_tokens_total`), or how many requests the KV-cache-aware router sent
to each instance (`disagg_router_decisions_total`), before and after a request of its own learns
whether someone else sent a prompt sharing its prefix, and where. So both need the model's
`detailed_metrics` parameter set to true: for deployments whose metrics port clients cannot reach.
"""

from __future__ import annotations

from collections.abc import Mapping

DETAILED_METRICS_PARAMETER = "detailed_metrics"
PROMPT_REVEALING_METRICS = frozenset({"prefix_cache_hit_tokens_total", "disagg_router_decisions_total"})


def detailed_metrics(parameters: Mapping[str, str]) -> bool:
    """The `detailed_metrics` parameter of a config.pbtxt; empty or absent means false."""
    raw = parameters.get(DETAILED_METRICS_PARAMETER, "")
    if raw.lower() in ("", "0", "false", "no"):
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    raise ValueError(f"{DETAILED_METRICS_PARAMETER}={raw!r}: use true or false")


def published(descriptions: Mapping[str, str], detailed: bool) -> dict[str, str]:
    """`descriptions` (metric name -> help text) less the prompt-revealing metrics unless `detailed`."""
    return {name: text for name, text in descriptions.items() if detailed or name not in PROMPT_REVEALING_METRICS}
