"""The study's command (`python -m planner.study_report`, `disagg-serve study`): it runs planner/study.py and
writes the JSON, the tables on stdout and the PNGs next to the JSON."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from client.metrics import Slo  # noqa: E402
from planner.calibration import Calibration  # noqa: E402
from planner.simulator import SchedulerLimits  # noqa: E402
from planner.study import (  # noqa: E402
    DEFAULT_LOADS,
    DEFAULT_WORKERS,
    PRESETS,
    SLO_MULTIPLE,
    Comparison,
    StudyPoint,
    best_split,
    comparisons,
    default_slo,
    frontier,
    lone_request,
    matched_shares,
    near_best,
    run_study,
)
from planner.validate import DEFAULT_CALIBRATION, REPO_ROOT  # noqa: E402


def best_splits_table(points: Sequence[StudyPoint]) -> str:
    lines = ["| workers | load (per worker) | best C:G | C within 5% | tok/s/worker | tok/s/user | TTFT p90 s "
             "| goodput/worker | aggregated tok/s/worker | aggregated tok/s/user | aggregated goodput/worker |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({p.workers for p in points}):
        for load in sorted({p.load for p in points if p.workers == n}):
            here = [p for p in points if p.workers == n and p.load == load]
            best, agg = best_split(here), next(p for p in here if p.aggregated)
            near = near_best(here)
            span = f"{near[0]}-{near[-1]}" if len(near) > 1 else "-"
            lines.append(f"| {n} | {load:g} | {best.split} | {span} | {best.throughput_per_worker:.2f} | "
                         f"{best.tokens_per_user:.2f} | {best.ttft_p90_ms / 1000:.1f} | "
                         f"{best.goodput_per_worker:.2f} | {agg.throughput_per_worker:.2f} | "
                         f"{agg.tokens_per_user:.2f} | {agg.goodput_per_worker:.2f} |")
    return "\n".join(lines)


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| workers | max goodput/worker agg | max goodput/worker disagg (split) | ratio | tok/s/worker at "
             "TPOT SLO agg / disagg | max speedup at equal tok/s/user | disagg wins from tok/s/user |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        at_slo = f"{num(c.throughput_at_slo_aggregated)} / {num(c.throughput_at_slo_disaggregated)}"
        speedup = f"{num(c.max_speedup)}x at {num(c.max_speedup_at_tokens_per_user)}" if c.max_speedup else "-"
        lines.append(f"| {c.workers} | {c.max_goodput_aggregated:.2f} | {c.max_goodput_disaggregated:.2f} "
                     f"({c.best_goodput_point}) | {num(c.goodput_ratio)} | {at_slo} | {speedup} | "
                     f"{num(c.disaggregated_wins_from_tokens_per_user)} |")
    return "\n".join(lines)


def pareto_figure(points: Sequence[StudyPoint], slo: Slo, title: str, path: Path) -> None:
    """One panel per worker count: the aggregated frontier against the frontier over all splits,
    every disaggregated point faint behind, the TPOT SLO as a vertical line."""
    counts = sorted({p.workers for p in points})
    columns = min(2, len(counts))
    rows = math.ceil(len(counts) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(7 * columns, 5 * rows), squeeze=False)
    for axes, n in zip(grid.flat, counts):
        mine = [p for p in points if p.workers == n]
        others = [p for p in mine if not p.aggregated and p.meets_ttft(slo)]
        axes.scatter([p.tokens_per_user for p in others], [p.throughput_per_worker for p in others],
                     color="tab:orange", alpha=0.2, s=12, label="splits within the TTFT SLO")
        for label, color, curve in (("aggregated", "tab:blue", frontier([p for p in mine if p.aggregated], slo)),
                                    ("disaggregated, best split", "tab:orange",
                                     frontier([p for p in mine if not p.aggregated], slo))):
            axes.plot([p.tokens_per_user for p in curve], [p.throughput_per_worker for p in curve], marker="o",
                      color=color, label=label)
            for p in curve:
                note = f"c{p.load:g}" if p.aggregated else f"{p.split} c{p.load:g}"
                axes.annotate(note, (p.tokens_per_user, p.throughput_per_worker), textcoords="offset points",
                              xytext=(4, 4), fontsize=7)
        if slo.tpot_ms:
            axes.axvline(1000.0 / slo.tpot_ms, color="grey", linestyle="--", label=f"TPOT SLO {slo.tpot_ms:g} ms")
        axes.set_title(f"{n} workers")
        axes.set_xlabel("tok/s/user (1 / median TPOT)")
        axes.set_ylabel("output tok/s per worker")
        axes.grid(True, alpha=0.3)
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=7)
    for axes in list(grid.flat)[len(counts):]:
        axes.set_visible(False)
    figure.suptitle(f"{title}\nfrontiers of the points with TTFT p90 <= {slo.ttft_ms:g} ms; "
                    "cL: L requests in flight per worker", fontsize=10)
    _save(figure, path)


def split_figure(points: Sequence[StudyPoint], matched: dict[int, float], title: str, path: Path) -> None:
    """The best split's context share C/N against the load, one line per worker count, and the
    rate-matched shares (batch -> share) as horizontal lines."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for batch, share in matched.items():
        axes.axhline(share, color="grey", linestyle=":", label=f"rate-matched, generation batch {batch}: {share:.2f}")
    for n in sorted({p.workers for p in points}):
        loads = sorted({p.load for p in points if p.workers == n})
        best = [best_split([p for p in points if p.workers == n and p.load == load]) for load in loads]
        axes.plot(loads, [b.context / n for b in best], marker="o", label=f"{n} workers")
        for b in best:
            axes.annotate(b.split, (b.load, b.context / n), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("requests in flight per worker")
    axes.set_ylabel("context share C / N of the best split (most goodput)")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(f"{title}\nbest context:generation split by load", fontsize=10)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(points: Sequence[StudyPoint], slo: Slo, matched: dict[int, float], title: str, out_dir: Path, stem: str,
           command: str) -> None:
    """The PNGs next to the study's JSON, and the tables on stdout."""
    pareto_figure(points, slo, title, out_dir / f"{stem}-pareto.png")
    split_figure(points, matched, title, out_dir / f"{stem}-best-split.png")
    shares = ", ".join(f"{share:.3f} at generation batch {batch}" for batch, share in matched.items())
    print(f"{command}\nSLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms; tok/s per worker; "
          f"goodput = tok/s per worker of the requests within both SLOs; rate-matched C/N {shares}\n")
    print(comparison_table(comparisons(points, slo)))
    print()
    print(best_splits_table(points))
    print(f"\nwrote {out_dir / stem}-pareto.png, -best-split.png")


def _repo_path(path: Path) -> str:
    """The path relative to the repository when it lies inside, so the JSON reads the same on any checkout."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _numbers(text: str, kind: type) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="isl1024-osl256")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--workers", default=",".join(map(str, DEFAULT_WORKERS)), help="total worker counts")
    parser.add_argument("--loads", default=",".join(f"{x:g}" for x in DEFAULT_LOADS),
                        help="requests in flight per worker (closed loop)")
    parser.add_argument("--slo-ttft-ms", type=float, help=f"default: {SLO_MULTIPLE:g}x a lone request's TTFT")
    parser.add_argument("--slo-tpot-ms", type=float, help=f"default: {SLO_MULTIPLE:g}x a lone request's TPOT")
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerLimits.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerLimits.max_num_batched_tokens)
    parser.add_argument("--min-measured", type=int, default=16, help="fewest requests measured per point")
    parser.add_argument("--exhaustive-up-to", type=int, default=16, help="every split up to this many workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "study")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="no simulation: the tables, PNGs and the JSON's comparisons again from its points")
    args = parser.parse_args(argv)
    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        points = [StudyPoint(**{f.name: p[f.name] for f in fields(StudyPoint)}) for p in data["points"]]
        title = study_title(data["preset"], Path(data["calibration"]))
        matched = matched_shares(Calibration.load(REPO_ROOT / data["calibration"]), PRESETS[data["preset"]],
                                 SchedulerLimits(**data["limits"]))
        slo = Slo(**data["slo"])
        data["comparisons"] = comparison_records(points, slo)  # derived from the points: kept current
        args.replot.write_text(json.dumps(data, indent=1) + "\n")
        report(points, slo, matched, title, args.replot.parent, args.replot.stem, data["command"])
        return 0
    try:
        workers, loads = _numbers(args.workers, int), _numbers(args.loads, float)
        if not workers or min(workers) < 2 or not loads or min(loads) <= 0:
            raise ValueError("--workers wants counts >= 2 and --loads positive numbers")
        calibration = Calibration.load(args.calibration)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    classes = PRESETS[args.preset]
    limits = SchedulerLimits(args.max_num_seqs, args.max_num_batched_tokens)
    lone = lone_request(calibration, classes, limits)
    matched = matched_shares(calibration, classes, limits)
    fallback = default_slo(lone)
    slo = Slo(args.slo_ttft_ms if args.slo_ttft_ms is not None else fallback.ttft_ms,
              args.slo_tpot_ms if args.slo_tpot_ms is not None else fallback.tpot_ms)
    print(f"{args.preset} on {args.calibration.name}: SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms",
          file=sys.stderr, flush=True)
    began = time.perf_counter()
    points = run_study(calibration, classes, workers, loads, slo, limits, args.min_measured,
                       f"{args.seed}-{args.preset}", args.exhaustive_up_to, lone.e2e_s,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - began
    command = "python -m planner.study_report " + shlex.join(argv)
    title = study_title(args.preset, args.calibration)
    stem = f"{args.preset}-{args.calibration.stem}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({
        "command": command, "preset": args.preset, "workload": ", ".join(map(str, classes)),
        "calibration": _repo_path(args.calibration), "calibration_description": calibration.description,
        "slo": asdict(slo), "limits": asdict(limits), "workers": sorted(set(workers)), "loads": list(loads),
        "min_measured": args.min_measured, "ramp_s": round(lone.e2e_s, 3), "rate_matched_share": matched,
        "exhaustive_up_to": args.exhaustive_up_to, "seed": args.seed,
        "elapsed_s": round(elapsed, 1), "simulated_points": len(points),
        "comparisons": comparison_records(points, slo),
        "points": [{**asdict(p), "split": p.split} for p in points],
    }, indent=1) + "\n")
    print(f"{len(points)} points in {elapsed:.0f} s", file=sys.stderr)
    report(points, slo, matched, title, args.out_dir, stem, command)
    return 0


def study_title(preset: str, calibration: Path) -> str:
    return f"{preset}, simulated with {calibration.name}"


def comparison_records(points: Sequence[StudyPoint], slo: Slo) -> list[dict]:
    return [{**asdict(c), "goodput_ratio": c.goodput_ratio} for c in comparisons(points, slo)]


if __name__ == "__main__":
    raise SystemExit(main())
