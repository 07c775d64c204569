"""How long the engine's work takes on one worker: the simulator's only source of times.

A calibration belongs to one (model, device, dtype, threads). Prefill is quadratic in the chunk
(the linear layers are linear in tokens, attention over the chunk and its cached context is not);
a decode step costs a per-batch base (piecewise linear in the batch size) plus a term linear in
the context tokens the batch attends over; a KV transfer is a link latency plus bytes over a
bandwidth; each request also pays the server's fixed costs (tokenizing, gRPC, the ensemble).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class CalibrationError(ValueError):
    """A calibration file is missing a field or has a value the simulator cannot use."""


@dataclass(frozen=True)
class Calibration:
    description: str  # model, device, dtype, threads, and where the numbers came from
    command: str  # the command that produced this file
    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_token_squared_s: float  # times chunk_tokens * (chunk_tokens + cached_tokens)
    decode_batch_sizes: tuple[int, ...]  # ascending; the points of the per-batch base
    decode_base_s: tuple[float, ...]  # step time at each batch size, before the context term
    decode_per_context_token_s: float  # per token of context attended over, summed over the batch
    kv_bytes_per_token: int
    kv_transfer_latency_s: float
    kv_transfer_bytes_per_s: float
    request_overhead_s: float  # arrival to the engine, plus the first response back, every path
    disaggregated_overhead_s: float  # what the orchestrator adds to a disaggregated request's TTFT
    kv_capacity_tokens: int  # a worker's KV cache, in tokens

    def __post_init__(self) -> None:
        sizes, bases = self.decode_batch_sizes, self.decode_base_s
        if not sizes or len(sizes) != len(bases) or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise CalibrationError("decode_batch_sizes must be ascending distinct sizes >= 1, one per decode_base_s")
        if self.kv_transfer_bytes_per_s <= 0 or self.kv_capacity_tokens <= 0 or self.kv_bytes_per_token <= 0:
            raise CalibrationError("kv_transfer_bytes_per_s, kv_capacity_tokens, kv_bytes_per_token must be positive")

    def prefill_time(self, tokens: int, cached_tokens: int = 0) -> float:
        """One prompt chunk of `tokens` after `cached_tokens` already in the KV cache."""
        if tokens <= 0:
            return 0.0
        return (self.prefill_fixed_s + self.prefill_per_token_s * tokens
                + self.prefill_per_token_squared_s * tokens * (tokens + cached_tokens))

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        """One decode step of `batch` sequences attending over `context_tokens` in all."""
        if batch <= 0:
            return 0.0
        return _interpolate(self.decode_batch_sizes, self.decode_base_s, batch) + (
            self.decode_per_context_token_s * context_tokens)

    def kv_transfer_time(self, tokens: int) -> float:
        return self.kv_transfer_latency_s + tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
            data["decode_batch_sizes"] = tuple(int(size) for size in data["decode_batch_sizes"])
            data["decode_base_s"] = tuple(float(base) for base in data["decode_base_s"])
            return cls(**data)
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise CalibrationError(f"{path} is not a calibration file ({type(error).__name__}: {error})") from None


def _interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise linear through the points, extended linearly past the last two (flat with one point)."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        return ys[0]
    index = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
