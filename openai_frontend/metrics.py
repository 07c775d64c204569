"""The frontend's request metrics, under vLLM's names, so dashboards built for vLLM read them.

Measured where the client sees them: from the request's arrival at the frontend to each streamed
chunk. The frontend cannot see inside the engine's scheduler, so `num_requests_waiting` counts
requests sent to Triton that have no first token yet (queued or prefilling), `num_requests_running`
those streaming tokens, and `request_queue_time_seconds` is the time from arrival until the
request is sent to Triton (template, tokenization, readiness); the engine's own queue is in TTFT,
and its depth on Triton's metrics port (`disagg_sequences_waiting`).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; wide enough for a CPU engine's long prompts, fine enough near the GPU's tens of ms.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_INTERVAL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                          20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
LABELS = ("model_name",)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FrontendMetrics:
    """The metric families of one frontend, in a registry of its own (several apps may share a process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name

        def labelled(metric):
            return metric.labels(model_name=model_name)

        self.ttft = labelled(Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token",
                                       LABELS, registry=self.registry, buckets=LATENCY_BUCKETS))
        self.inter_token = labelled(Histogram("vllm:inter_token_latency_seconds",
                                              "Time between successive streamed chunks of a request", LABELS,
                                              registry=self.registry, buckets=TOKEN_INTERVAL_BUCKETS))
        self.e2e = labelled(Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token",
                                      LABELS, registry=self.registry, buckets=REQUEST_BUCKETS))
        self.queue = labelled(Histogram("vllm:request_queue_time_seconds",
                                        "Time from arrival until the request is sent to Triton", LABELS,
                                        registry=self.registry, buckets=REQUEST_BUCKETS))
        self.prompt_tokens = labelled(Counter("vllm:prompt_tokens", "Prompt tokens of the requests sent to Triton",
                                              LABELS, registry=self.registry))
        self.generation_tokens = labelled(Counter("vllm:generation_tokens", "Tokens generated", LABELS,
                                                  registry=self.registry))
        self.running = labelled(Gauge("vllm:num_requests_running", "Requests streaming tokens", LABELS,
                                      registry=self.registry))
        self.waiting = labelled(Gauge("vllm:num_requests_waiting", "Requests sent that have no first token yet",
                                      LABELS, registry=self.registry))
        self._success = Counter("vllm:request_success", "Requests finished, by finish reason",
                                (*LABELS, "finished_reason"), registry=self.registry)

    def succeeded(self, finish_reason: str) -> None:
        self._success.labels(model_name=self.model_name, finished_reason=finish_reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's path through the metrics: arrival, dispatch, each chunk, the end (once)."""

    def __init__(self, metrics: FrontendMetrics) -> None:
        self._metrics = metrics
        self._arrival = time.monotonic()
        self._last_chunk: float | None = None
        self._state = "arrived"  # -> waiting -> running -> ended

    def dispatched(self, prompt_tokens: int) -> None:
        self._metrics.queue.observe(time.monotonic() - self._arrival)
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.waiting.inc()
        self._state = "waiting"

    def chunk(self, tokens: int) -> None:
        now = time.monotonic()
        if self._state == "waiting":
            self._metrics.ttft.observe(now - self._arrival)
            self._metrics.waiting.dec()
            self._metrics.running.inc()
            self._state = "running"
        elif self._last_chunk is not None:
            self._metrics.inter_token.observe(now - self._last_chunk)
        self._last_chunk = now
        self._metrics.generation_tokens.inc(tokens)

    def ended(self, finish_reason: str | None) -> None:
        """`finish_reason` None: the request failed or was cancelled."""
        if self._state == "ended":
            return
        gauge = {"waiting": self._metrics.waiting, "running": self._metrics.running}.get(self._state)
        if gauge is not None:
            gauge.dec()
        self._state = "ended"
        if finish_reason is not None:
            self._metrics.e2e.observe(time.monotonic() - self._arrival)
            self._metrics.succeeded(finish_reason)
