"""Rate matching, as the seed's measurement methodology describes it.

Context and generation workers are measured separately: context workers for the request rate
they sustain within a TTFT limit, generation workers for output tok/s and tok/s/user at each
concurrency. For a generation operating point, as many context workers are needed as make
their request rate equal the generation side's, and throughput per worker counts both:

    TotalOutputTokens/s / ((NumCtxWorkers * GenReqRate / CtxReqRate) + NumGenWorkers)

where CtxReqRate is the rate NumCtxWorkers sustain together. Context workers come out
fractional: this is the ideal ("speed of light") matching behind the seed's rate-matched
Pareto curves, not a deployable count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ContextMeasurement:
    """A context-side run: `request_rate` is what its `num_workers` sustained together."""

    num_workers: int
    request_rate: float
    ttft_p99_ms: float

    @property
    def rate_per_worker(self) -> float:
        return self.request_rate / self.num_workers


@dataclass(frozen=True)
class GenerationMeasurement:
    """A generation-side operating point (one load level)."""

    load: str  # e.g. "c8": concurrency 8
    num_workers: int
    output_throughput: float  # tok/s of all num_workers together
    request_rate: float  # requests/s they completed
    tokens_per_second_per_user: float


@dataclass(frozen=True)
class RateMatchedPoint:
    load: str
    tokens_per_second_per_user: float
    output_throughput: float
    context_workers: float  # NumCtxWorkers * GenReqRate / CtxReqRate
    generation_workers: int
    throughput_per_worker: float

    @property
    def context_to_generation_ratio(self) -> float:
        return self.context_workers / self.generation_workers


def best_context(measurements: Sequence[ContextMeasurement], ttft_limit_ms: float) -> ContextMeasurement:
    """The context run with the highest request rate per worker whose TTFT p99 meets the limit."""
    eligible = [m for m in measurements if m.ttft_p99_ms <= ttft_limit_ms and m.request_rate > 0]
    if not eligible:
        raise ValueError(f"no context measurement has TTFT p99 within {ttft_limit_ms:g} ms")
    return max(eligible, key=lambda m: m.rate_per_worker)


def rate_match(context: ContextMeasurement, generation: GenerationMeasurement) -> RateMatchedPoint:
    """The generation point with just enough context workers to feed it."""
    context_workers = context.num_workers * generation.request_rate / context.request_rate
    return RateMatchedPoint(
        load=generation.load,
        tokens_per_second_per_user=generation.tokens_per_second_per_user,
        output_throughput=generation.output_throughput,
        context_workers=context_workers,
        generation_workers=generation.num_workers,
        throughput_per_worker=generation.output_throughput / (context_workers + generation.num_workers),
    )
