"""A benchmark run as JSON (what was run, its statistics, every request) and as Markdown."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client.metrics import RequestMeasurement, RunSummary


@dataclass(frozen=True)
class RunConfig:
    """What a run measured and how; `label` names its curve in plots."""

    label: str
    url: str
    model: str
    concurrency: int | None  # closed loop, or
    request_rate: float | None  # open loop: Poisson arrivals, requests/s
    workload: str
    num_requests: int
    warmup_requests: int
    time_limit_s: float
    workers: int
    seed: int
    temperature: float | None
    eos_suppressing_input: str | None  # None: the server may stop before max_tokens

    @property
    def load(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"rate {self.request_rate:g}/s"


@dataclass(frozen=True)
class RunResult:
    config: RunConfig
    summary: RunSummary
    requests: list[RequestMeasurement]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunResult:
        try:
            data = json.loads(Path(path).read_text())
            requests = [RequestMeasurement(**{**entry, "itl_s": tuple(entry["itl_s"])}) for entry in data["requests"]]
            return cls(RunConfig(**data["config"]), RunSummary.from_dict(data["summary"]), requests)
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a benchmark run result ({type(error).__name__}: {error})") from None


def load_runs(path: Path) -> list[RunResult]:
    """A run file, or every run file in a sweep directory."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    return [RunResult.load(file) for file in files]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_table(result: RunResult) -> str:
    """One run: latency percentiles, then throughput."""
    s, c = result.summary, result.config
    lines = [
        f"**{c.label}**: {c.model} at {c.url}, {c.load}, workload {c.workload}, {c.workers} worker(s)",
        "",
        "| latency (ms) | mean | p50 | p90 | p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, stats in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        values = [_number(stats and getattr(stats, q)) for q in ("mean", "p50", "p90", "p99")]
        lines.append(f"| {name} | {' | '.join(values)} |")
    lines += [
        "",
        "| throughput | value |",
        "|---|---:|",
        f"| requests completed / failed / cancelled | {s.completed} / {s.failed} / {s.cancelled} |",
        f"| measured phase (s) | {s.duration_s:.2f} |",
        f"| output tokens (requested) | {s.output_tokens} ({s.requested_output_tokens}) |",
        f"| request throughput (req/s) | {s.request_throughput:.3f} |",
        f"| output tok/s | {s.output_throughput:.2f} |",
        f"| output tok/s per worker | {s.output_throughput_per_worker:.2f} |",
        f"| tok/s/user (1 / median TPOT) | {_number(s.tokens_per_second_per_user)} |",
    ]
    if s.goodput is not None:
        targets = (("TTFT", s.slo.ttft_ms), ("TPOT", s.slo.tpot_ms))
        slo = ", ".join(f"{name} <= {value:g} ms" for name, value in targets if value is not None)
        lines.append(f"| goodput (req/s within {slo}) | {s.goodput:.3f} ({s.goodput_fraction:.0%}) |")
    return "\n".join(lines)


def sweep_table(results: Sequence[RunResult]) -> str:
    """One row per run, for comparing the points of a sweep."""
    lines = [
        "| label | load | done | req/s | out tok/s | tok/s/worker | tok/s/user "
        "| TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | goodput req/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        s = result.summary
        ttft, tpot = s.ttft_ms, s.tpot_ms
        cells = [
            result.config.label,
            result.config.load,
            str(s.completed),
            f"{s.request_throughput:.3f}",
            f"{s.output_throughput:.2f}",
            f"{s.output_throughput_per_worker:.2f}",
            _number(s.tokens_per_second_per_user),
            *(_number(stats and getattr(stats, q)) for stats in (ttft, tpot) for q in ("p50", "p99")),
            "-" if s.goodput is None else f"{s.goodput:.3f}",
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)
