"""The live planner: watch a running server's metrics, recommend a split, and apply it.

    disagg-serve plan --live --metrics-url localhost:8002 --deployment deployment.yaml \\
        --slo-ttft-ms 3000 --slo-tpot-ms 300 --max-workers 4 [--apply]

Every `--poll-s` it reads the orchestrator's counters from the metrics port and, over the last
`--window-s`, estimates the arrival rate, the mean prompt and answer lengths (ISL, OSL), the mean
time to first token and per output token, and the queue depth (sequences waiting in the engines).
The recommendation is the smallest deployment (fewest workers, then most goodput) of at most
`--max-workers` that planner.simulator says meets the SLOs at that rate and those lengths; a
smaller one than the current must meet them at the rate times 1 + `--headroom`, so that a load
near a boundary does not flip the deployment back and forth. With no request in the window the
recommendation is the minimum, 1 + 1. A recommendation is acted on only when it has held for
`--polls-to-change` polls in a row and `--cooldown-s` has passed since the last change.

With `--apply` the deployment file is rewritten (atomically; everything but the instance counts
kept). The orchestrator watching it does the rest (python_backend_utils/orchestration/
local_workers.py): new instances are loaded before they take requests; removed ones leave
rotation at once and are unloaded only when they hold no request and no unpulled KV.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from client.metrics import Slo
from planner.calibration import Calibration, CalibrationError
from planner.plan import PlanError, add_model_options, evaluate, render_deployment, smallest_meeting, write_atomically
from planner.simulator import SchedulerLimits, SimulatedDeployment, SimulatedRequest
from python_backend_utils.orchestration.deployment import Deployment, DeploymentError

MIN_SIMULATED_REQUESTS = 40


class MetricsError(RuntimeError):
    """The metrics endpoint did not answer, or not with what the orchestrator exports."""


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format: every sample by metric name, with its labels."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


@dataclass(frozen=True)
class Sample:
    """One scrape: the orchestrator's counters (summed over its instances) and the queue depth."""

    time_s: float
    requests: float
    disaggregated: float
    input_tokens: float
    output_tokens: float
    context_seconds: float
    generation_seconds: float
    waiting: float

    @classmethod
    def from_metrics(cls, metrics: dict[str, list[tuple[dict[str, str], float]]], time_s: float) -> Sample:
        def total(name: str) -> float:
            return sum(value for _, value in metrics.get(name, []))

        if "disagg_orchestrator_requests_total" not in metrics:
            raise MetricsError("no disagg_orchestrator_requests_total: is disaggregated_serving_bls loaded there?")
        prefix = "disagg_orchestrator_"
        return cls(time_s, total(prefix + "requests_total"), total(prefix + "disaggregated_total"),
                   total(prefix + "input_tokens_total"), total(prefix + "output_tokens_total"),
                   total(prefix + "context_phase_seconds_total"), total(prefix + "generation_phase_seconds_total"),
                   total("disagg_sequences_waiting"))


@dataclass(frozen=True)
class LoadEstimate:
    """What the server saw over one window."""

    rate: float  # requests per second
    isl: float  # mean prompt tokens
    osl: float  # mean output tokens
    ttft_ms: float | None  # mean context phase (arrival at the orchestrator to first token)
    tpot_ms: float | None  # mean time per output token after the first
    queue_depth: float  # sequences waiting in the engines, at the last poll

    @classmethod
    def between(cls, first: Sample, last: Sample) -> LoadEstimate:
        span = max(last.time_s - first.time_s, 1e-9)
        requests = last.requests - first.requests
        disaggregated = last.disaggregated - first.disaggregated
        later_tokens = (last.output_tokens - first.output_tokens) - disaggregated
        return cls(
            rate=requests / span,
            isl=(last.input_tokens - first.input_tokens) / requests if requests else 0.0,
            osl=(last.output_tokens - first.output_tokens) / requests if requests else 0.0,
            ttft_ms=1000 * (last.context_seconds - first.context_seconds) / disaggregated if disaggregated else None,
            tpot_ms=1000 * (last.generation_seconds - first.generation_seconds) / later_tokens
            if later_tokens > 0 else None,
            queue_depth=last.waiting,
        )

    def __str__(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f} ms"

        return (f"{self.rate:.2f} req/s, ISL {self.isl:.0f}, OSL {self.osl:.1f}, TTFT {ms(self.ttft_ms)}, "
                f"TPOT {ms(self.tpot_ms)}, queue {self.queue_depth:.0f}")


@dataclass(frozen=True)
class Split:
    context: int
    generation: int

    @property
    def workers(self) -> int:
        return self.context + self.generation

    def __str__(self) -> str:
        return f"{self.context}+{self.generation}"


@dataclass(frozen=True)
class Sizing:
    """How recommendations are made: the model of the engine, the SLOs, the limits."""

    calibration: Calibration
    slo: Slo
    attainment: float
    max_workers: int
    headroom: float = 0.25
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)
    seed: int = 0

    def recommend(self, load: LoadEstimate, current: Split) -> Split:
        """The smallest split meeting the SLOs (a shrink at the rate times 1 + headroom); the one with
        the most goodput at max_workers when none does; 1+1 when nothing arrived."""
        if load.rate <= 0 or load.isl < 1:
            return Split(1, 1)
        request = SimulatedRequest(max(1, round(load.isl)), max(1, round(load.osl)))
        evaluations = []
        for workers in range(2, self.max_workers + 1):
            rate = load.rate * (1 + self.headroom) if workers < current.workers else load.rate
            count = max(MIN_SIMULATED_REQUESTS, round(rate * 30))
            for context in range(1, workers):
                deployment = SimulatedDeployment(context_workers=context, generation_workers=workers - context,
                                        limits=self.limits)
                evaluations.append(evaluate(self.calibration, deployment, [request] * count, rate, self.slo, self.seed))
        chosen = smallest_meeting(evaluations, self.attainment)
        if chosen is None:
            largest = [e for e in evaluations if e.deployment.workers == self.max_workers]
            chosen = max(largest, key=lambda e: (e.goodput, e.attainment))
        return Split(chosen.deployment.context_workers, chosen.deployment.generation_workers)


@dataclass
class Hysteresis:
    """Acts on a recommendation once it has held for `polls` polls in a row, and not within
    `cooldown_s` of the last change."""

    current: Split
    polls: int
    cooldown_s: float
    candidate: Split | None = None
    streak: int = 0
    last_change_s: float = float("-inf")

    def observe(self, recommendation: Split, now_s: float) -> Split | None:
        """The split to change to now, or None."""
        if recommendation == self.current:
            self.candidate, self.streak = None, 0
            return None
        if recommendation == self.candidate:
            self.streak += 1
        else:
            self.candidate, self.streak = recommendation, 1
        if self.streak < self.polls or now_s - self.last_change_s < self.cooldown_s:
            return None
        self.current, self.candidate, self.streak, self.last_change_s = recommendation, None, 0, now_s
        return recommendation


def serving_split(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> Split | None:
    """The local instances the orchestrator's routers have in rotation (disagg_router_workers)."""
    members = [labels for labels, value in metrics.get("disagg_router_workers", []) if value == 1.0
               and "@" not in labels.get("worker", "")]
    if not members:
        return None
    return Split(sum(m.get("group") == "context" for m in members),
                 sum(m.get("group") == "generation" for m in members))


def read_split(path: Path) -> tuple[Split, dict]:
    """The deployment file's local instance counts, and its parsed content."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        deployment = Deployment.from_dict(raw)
    except (OSError, yaml.YAMLError, DeploymentError) as error:
        raise PlanError(f"--deployment {path}: {error}") from None
    return Split(deployment.context_servers.num_instances, deployment.generation_servers.num_instances), raw


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    address = url if "://" in url else f"http://{url}"
    address = address if address.rstrip("/").endswith("/metrics") else address.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as response:
            return parse_metrics(response.read().decode())
    except (urllib.error.URLError, OSError) as error:
        raise MetricsError(f"cannot read {address}: {error}") from None


@dataclass
class LivePlanner:
    """One poll at a time (`poll`), or a loop until `stop` is set (`run`)."""

    metrics_url: str
    deployment_file: Path
    sizing: Sizing
    window_s: float
    hysteresis: Hysteresis
    apply: bool
    log: Callable[[str], None] = print
    samples: deque[Sample] = field(default_factory=deque)
    changes: list[tuple[float, Split]] = field(default_factory=list)

    def poll(self, now_s: float | None = None) -> Split | None:
        now_s = time.monotonic() if now_s is None else now_s
        metrics = scrape(self.metrics_url)
        sample = Sample.from_metrics(metrics, now_s)
        serving = serving_split(metrics)
        if self.changes and serving is not None and serving != self.hysteresis.current:
            # Loading new instances takes seconds, under load more: the window and the cooldown
            # start again once the server runs the split, so the change is judged by its effect.
            self.samples.clear()
            self.samples.append(sample)
            self.hysteresis.last_change_s, self.hysteresis.candidate, self.hysteresis.streak = now_s, None, 0
            self.log(f"waiting for the server to run {self.hysteresis.current} (it runs {serving})")
            return None
        self.samples.append(sample)
        while len(self.samples) > 2 and now_s - self.samples[1].time_s >= self.window_s:
            self.samples.popleft()
        if len(self.samples) < 2:
            return None
        load = LoadEstimate.between(self.samples[0], self.samples[-1])
        recommendation = self.sizing.recommend(load, self.hysteresis.current)
        change = self.hysteresis.observe(recommendation, now_s)
        self.log(f"{load}; now {self.hysteresis.current if change is None else change}, recommended "
                 f"{recommendation}" + (f" ({self.hysteresis.streak}/{self.hysteresis.polls})"
                                        if self.hysteresis.streak else ""))
        if change is None:
            return None
        self.changes.append((now_s, change))
        if self.apply:
            _, raw = read_split(self.deployment_file)
            write_atomically(self.deployment_file, render_deployment(change.context, change.generation, raw))
            self.log(f"applied {change}: wrote {self.deployment_file}")
        else:
            self.log(f"would change to {change} (--apply writes {self.deployment_file})")
        return change

    def run(self, poll_s: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except MetricsError as error:
                self.log(f"skipped a poll: {error}")
            stop.wait(poll_s)


def build(argv: Sequence[str], log: Callable[[str], None] = print) -> tuple[LivePlanner, float]:
    """The planner and its poll interval from the command line."""
    parser = argparse.ArgumentParser(prog="disagg-serve plan --live", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--metrics-url", required=True, help="the server's metrics port, e.g. localhost:8002")
    parser.add_argument("--deployment", type=Path, required=True, help="the deployment file the orchestrator watches")
    parser.add_argument("--apply", action="store_true", help="rewrite the deployment file (else only print)")
    parser.add_argument("--max-workers", type=int, required=True, help="most context + generation instances")
    parser.add_argument("--poll-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=60.0, help="the span the load is estimated over")
    parser.add_argument("--polls-to-change", type=int, default=3)
    parser.add_argument("--cooldown-s", type=float, default=120.0, help="no change within this long of the last")
    parser.add_argument("--headroom", type=float, default=0.25,
                        help="a smaller deployment must meet the SLOs at the rate times 1 + this")
    args = parser.parse_args(list(argv))
    if args.max_workers < 2 or args.polls_to_change < 1 or args.poll_s <= 0 or args.window_s <= 0:
        raise PlanError("--max-workers must be at least 2, --polls-to-change at least 1, "
                        "--poll-s and --window-s above 0")
    current, _ = read_split(args.deployment)
    sizing = Sizing(Calibration.load(args.calibration), Slo(args.slo_ttft_ms, args.slo_tpot_ms), args.slo_attainment,
                    args.max_workers, args.headroom, SchedulerLimits(args.max_num_seqs, args.max_num_batched_tokens),
                    args.seed)
    planner = LivePlanner(args.metrics_url, args.deployment, sizing, args.window_s,
                          Hysteresis(current, args.polls_to_change, args.cooldown_s), args.apply, log)
    return planner, args.poll_s


def main(argv: list[str] | None = None) -> int:
    try:
        planner, poll_s = build(sys.argv[1:] if argv is None else argv, lambda line: print(line, flush=True))
    except (OSError, CalibrationError, PlanError) as error:
        print(f"disagg-serve plan --live: {error}", file=sys.stderr)
        return 2
    try:
        planner.run(poll_s, threading.Event())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
