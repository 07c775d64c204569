"""Publishing our numbers through Triton's custom metrics API (served on the metrics port).

Values are published as gauges set to their current value (totals included), so a snapshot
taken anywhere (engine stats, kv_transfer counters, orchestrator counters) maps onto them directly.
"""

from __future__ import annotations

import ctypes

import triton_python_backend_utils as pb_utils


def _keep_for_the_process(metric) -> None:
    """Never destroy `metric` (a family or a gauge): tritonserver keeps one family per name for the
    whole server, shared by every model instance that names it (each version of a model, their
    replacements after a reload). Deleting one instance's copy removes it for all of them, and the
    server then sets freed gauges (heap corruption, seen when a version reloaded next to a live
    one). A deletion is also a message to the server, which may not answer it while it unloads
    the model (an unload was seen to hang), and left to the interpreter's exit it messages a server
    the stub has already left. The cost: an unloaded instance's gauges keep their last values."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(metric))


class GaugeSet:
    """One gauge family per name, labelled with this model instance; `publish` sets them all."""

    def __init__(self, prefix: str, descriptions: dict[str, str], labels: dict[str, str]) -> None:
        self._gauges = {}
        for name, description in descriptions.items():
            family = pb_utils.MetricFamily(name=f"{prefix}_{name}", description=description,
                                           kind=pb_utils.MetricFamily.GAUGE)
            _keep_for_the_process(family)  # it also outlives its gauges, or setting them fails
            self._gauges[name] = family.Metric(labels=labels)
            _keep_for_the_process(self._gauges[name])

    def publish(self, values: dict[str, float]) -> None:
        for name, gauge in self._gauges.items():
            if name in values:
                gauge.set(float(values[name]))


class LabelledGauges:
    """One gauge family whose label sets appear at runtime (e.g. one per routed target)."""

    def __init__(self, name: str, description: str, labels: dict[str, str]) -> None:
        self._family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
        _keep_for_the_process(self._family)
        self._labels = labels
        self._gauges: dict[tuple[tuple[str, str], ...], object] = {}

    def set(self, labels: dict[str, str], value: float) -> None:
        key = tuple(sorted(labels.items()))
        gauge = self._gauges.get(key)
        if gauge is None:
            gauge = self._gauges[key] = self._family.Metric(labels={**self._labels, **labels})
            _keep_for_the_process(gauge)
        gauge.set(float(value))


ENGINE_METRICS = {
    "kv_blocks_total": "KV blocks in this instance's pool",
    "kv_blocks_free": "KV blocks on the free list",
    "kv_blocks_used": "KV blocks held by sequences (running, waiting for KV, or kept for a pull)",
    "sequences_running": "sequences in the running batch",
    "sequences_waiting": "sequences queued for blocks",
    "sequences_awaiting_kv": "generation-only sequences whose KV is being pulled",
    "sequences_kv_held": "context-only sequences whose KV waits for its pull",
    "preemptions_total": "sequences preempted for lack of blocks (recomputed later)",
    "kv_pull_fallbacks_total": "generation-only requests whose pull failed and were prefilled here",
    "prefix_cache_hit_tokens_total": "prompt tokens whose KV was reused from the prefix cache",
}

TRANSFER_METRICS = {
    "kv_bytes_received_total": "KV bytes pulled into this instance",
    "kv_bytes_sent_total": "KV bytes served from this instance",
    "kv_pulls_completed_total": "KV pulls completed",
    "kv_pulls_failed_total": "KV pulls that failed",
    "kv_pulls_in_flight": "KV pulls in progress",
    "kv_pulls_refused_total": "pull requests refused (wrong secret, unknown or expired handle)",
    "kv_unauthenticated_messages_total": "KV control messages dropped for lacking a valid deployment-key MAC",
    "kv_handles_expired_total": "published KV released unpulled at its time-to-live",
    "kv_handles_abandoned_total": "published KV released when its puller gave up after a failed pull",
    "kv_pinned_blocks": "KV blocks pinned for a pull",
    "kv_pull_seconds_total": "time spent in completed pulls",
}

ORCHESTRATOR_METRICS = {
    "requests_total": "requests received by the orchestrator",
    "disaggregated_total": "requests served by a context and a generation instance",
    "local_prefill_total": "short prompts sent straight to a generation instance",
    "context_retries_total": "context calls retried on another context instance",
    "context_fallbacks_total": "requests prefilled on the generation instance after context failures",
    "cancelled_total": "requests cancelled by the client",
    "context_phase_seconds_total": "time from request to first token, summed (divide by disaggregated_total)",
    "generation_phase_seconds_total": "time from first to last token, summed",
    "output_tokens_total": "tokens sent to clients",
    "input_tokens_total": "prompt tokens received",
    "stub_reloads_total": "instances on this server reloaded after their stub process died",
    "requests_in_flight": "requests holding a place under max_requests_in_flight",
    "requests_lingering": "answered requests still holding their place: a worker read that timed out has not returned",
    "rejected_total": "requests refused with UNAVAILABLE because max_requests_in_flight were in flight",
}

ROUTER_METRICS = {
    "disagg_router_targets": "1 for each instance in a router's rotation, by group, target and health "
    "(healthy=\"false\": out of rotation until a health check passes); 0 once removed from the deployment",
    "disagg_router_in_flight": "requests the orchestrator has in flight on each instance (a removed one drains to 0)",
    "disagg_router_decisions_total": "requests routed to each instance",
}
