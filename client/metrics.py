"""Per-request latencies and the per-run statistics made of them: pure functions, no server.

Definitions (all times from the client's clock, per request):
- TTFT: from sending the request to the first response that carries `text_output`.
- E2E: from sending the request to its final response.
- ITL: the gaps between consecutive responses that carry `text_output` (one per token when the
  server streams one token per response, as ours does).
- Output tokens: the responses that carry `text_output`, empty ones included (a character split
  across tokens is held back until complete). That is the generated token count on a server that
  streams one token per response, as ours and TensorRT-LLM's ensembles do. Re-tokenizing the
  text undercounts (seen here: 7 for 8 generated tokens, BPE merges what the model produced
  apart), so it is kept per request only as `retokenized_output_tokens`, a check for servers that
  pack several tokens into one response.
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for a single output token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

OK, ERROR, CANCELLED = "ok", "error", "cancelled"


@dataclass(frozen=True)
class RequestMeasurement:
    """One request of a run. `start_s` counts from the start of the measured phase."""

    index: int
    status: str
    start_s: float
    input_tokens: int
    max_tokens: int
    output_tokens: int = 0
    retokenized_output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: tuple[float, ...] = ()
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.status != OK or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Percentiles:
    """A latency distribution in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        milliseconds = [value * 1000.0 for value in values]
        return cls(
            mean=float(np.mean(milliseconds)),
            p50=percentile(milliseconds, 50),
            p90=percentile(milliseconds, 90),
            p99=percentile(milliseconds, 99),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), the convention of genai-perf."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass(frozen=True)
class Slo:
    """Latency targets a request must meet to count towards goodput; None means no target."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def any(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met_by(self, request: RequestMeasurement) -> bool:
        """A completed request within every target; a one-token answer has no TPOT to miss."""
        if request.status != OK:
            return False
        if self.ttft_ms is not None and (request.ttft_s is None or request.ttft_s * 1000.0 > self.ttft_ms):
            return False
        tpot = request.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000.0 <= self.tpot_ms


@dataclass(frozen=True)
class RunSummary:
    """A run's throughput and latency statistics. Rates are per second of the measured phase."""

    completed: int
    failed: int
    cancelled: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    requested_output_tokens: int
    request_throughput: float
    output_throughput: float
    output_throughput_per_worker: float
    tokens_per_second_per_user: float | None  # 1 / median TPOT: the speed one user sees
    ttft_ms: Percentiles | None
    tpot_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None
    goodput: float | None = None  # requests/s within the SLO; None without an SLO
    goodput_fraction: float | None = None  # of all requests sent in the measured phase
    slo: Slo = field(default_factory=Slo)

    @classmethod
    def from_dict(cls, data: dict) -> RunSummary:
        values = dict(data)
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            values[name] = Percentiles(**values[name]) if values[name] is not None else None
        values["slo"] = Slo(**values["slo"])
        return cls(**values)


def summarize(requests: Sequence[RequestMeasurement], duration_s: float, workers: int, slo: Slo) -> RunSummary:
    """Statistics of one run. `workers` divides the output throughput (tok/s per worker, the
    y axis of the seed's Pareto curves: GPUs there, engine instances here)."""
    if duration_s <= 0 or workers < 1:
        raise ValueError("duration_s must be positive and workers at least 1")
    done = [request for request in requests if request.status == OK]
    tpots = [request.tpot_s for request in done if request.tpot_s is not None]
    output_tokens = sum(request.output_tokens for request in done)
    tpot = Percentiles.of_seconds(tpots)
    good = sum(1 for request in requests if slo.met_by(request)) if slo.any else None
    return RunSummary(
        completed=len(done),
        failed=sum(1 for request in requests if request.status == ERROR),
        cancelled=sum(1 for request in requests if request.status == CANCELLED),
        duration_s=duration_s,
        input_tokens=sum(request.input_tokens for request in done),
        output_tokens=output_tokens,
        requested_output_tokens=sum(request.max_tokens for request in done),
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        output_throughput_per_worker=output_tokens / duration_s / workers,
        tokens_per_second_per_user=1000.0 / tpot.p50 if tpot is not None and tpot.p50 > 0 else None,
        ttft_ms=Percentiles.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot_ms=tpot,
        itl_ms=Percentiles.of_seconds([gap for r in done for gap in r.itl_s]),
        e2e_ms=Percentiles.of_seconds([r.e2e_s for r in done if r.e2e_s is not None]),
        goodput=good / duration_s if good is not None else None,
        goodput_fraction=good / len(requests) if good is not None and requests else None,
        slo=slo,
    )


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (more is better on both), by ascending x."""
    frontier: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda point: (-point[0], -point[1])):
        if not frontier or y > frontier[-1][1]:
            frontier.append((x, y))
    return frontier[::-1]
