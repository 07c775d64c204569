"""Which of the models' metrics are counters: every total that only grows, and nothing else."""

from __future__ import annotations

from python_backend_utils.triton_glue.metric_names import (
    COUNTERS,
    ENGINE_METRICS,
    ORCHESTRATOR_METRICS,
    PARAMS_METRICS,
    ROUTER_METRICS,
    TRANSFER_METRICS,
)

PUBLISHED = {**ENGINE_METRICS, **TRANSFER_METRICS, **PARAMS_METRICS, **ORCHESTRATOR_METRICS, **ROUTER_METRICS}


def test_every_counter_is_a_published_metric():
    assert COUNTERS <= set(PUBLISHED)


def test_the_totals_are_counters_and_the_pool_size_is_not():
    totals = {name for name in PUBLISHED if name.endswith("_total")}
    assert totals - COUNTERS == {"kv_blocks_total"}
