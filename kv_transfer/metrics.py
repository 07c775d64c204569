"""Plain counters, gauges and histograms; the models publish them to Prometheus later."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

COUNTERS = (
    # sender side
    "handles_published", "handles_pulled", "handles_revoked", "handles_expired", "handles_abandoned",
    "pulls_served", "pulls_refused", "serves_failed", "bytes_sent", "bytes_staged_sent",
    # receiver side
    "pulls_started", "pulls_completed", "pulls_failed", "bytes_received", "bytes_read_shared",
    "bytes_staged_received",
    # either
    "malformed_messages", "unauthenticated_messages", "release_callback_errors",
)
GAUGES = ("pinned_requests", "pinned_blocks", "serves_in_flight", "serves_queued", "pulls_in_flight",
          "staging_bytes_in_use", "most_sends_in_flight")


@dataclass
class Histogram:
    """Prometheus-style: cumulative counts per upper bound, plus sum and count."""

    bounds: tuple[float, ...] = DURATION_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        cumulative, running = {}, 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            cumulative[bound] = running
        return {"buckets": cumulative, "sum": self.total, "count": self.count}


class TransferMetrics:
    """Thread-safe: the service thread and the callers' threads both update it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS + GAUGES, 0)
        self._histograms = {"pull_duration_s": Histogram(), "serve_duration_s": Histogram()}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._values[name] = value

    def raise_to(self, name: str, value: int) -> None:
        """A high-water mark: the gauge keeps the largest value it was given."""
        with self._lock:
            self._values[name] = max(self._values[name], value)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def snapshot(self) -> dict:
        """Counters and gauges by name, histograms under their own names."""
        with self._lock:
            out: dict = dict(self._values)
            out.update({name: h.snapshot() for name, h in self._histograms.items()})
        return out
