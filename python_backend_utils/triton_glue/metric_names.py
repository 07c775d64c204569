"""The names and help texts of the metrics the models publish on Triton's metrics port, and which are
counters: without Triton, so that tests and the Grafana dashboard's check can read them."""

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

PARAMS_METRICS = {
    "context_params_rejected_total": "context_phase_params refused as malformed or failing authentication",
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
    "disagg_router_workers": "1 for each instance in a router's rotation, by group, target and health "
    "(healthy=\"false\": out of rotation until a health check passes); 0 once removed from the deployment",
    "disagg_router_in_flight": "requests the orchestrator has in flight on each instance (a removed one drains to 0)",
    "disagg_router_decisions_total": "requests routed to each instance",
}

# The totals that only grow, published as counters. (kv_blocks_total is the pool's size: a gauge.)
COUNTERS = frozenset({
    "preemptions_total", "kv_pull_fallbacks_total", "prefix_cache_hit_tokens_total",
    "kv_bytes_received_total", "kv_bytes_sent_total", "kv_pulls_completed_total", "kv_pulls_failed_total",
    "kv_pulls_refused_total", "kv_unauthenticated_messages_total", "kv_handles_expired_total",
    "kv_handles_abandoned_total", "kv_pull_seconds_total", "context_params_rejected_total",
    "requests_total", "disaggregated_total", "local_prefill_total", "context_retries_total",
    "context_fallbacks_total", "cancelled_total", "context_phase_seconds_total", "generation_phase_seconds_total",
    "output_tokens_total", "input_tokens_total", "stub_reloads_total", "rejected_total",
    "disagg_router_decisions_total",
})
