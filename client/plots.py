"""PNG charts of labelled sweeps: the seed's Pareto view and TPOT under rising load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from client.metrics import pareto_frontier  # noqa: E402


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    note: str  # printed beside the marker, e.g. "c4" for concurrency 4


@dataclass(frozen=True)
class Curve:
    label: str
    points: tuple[Point, ...]


def pareto_chart(curves: Sequence[Curve], path: Path) -> None:
    """tok/s per worker (y) against tok/s/user (x): every point as a marker, each curve's
    Pareto frontier as its line (up and to the right is better)."""
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for curve in (curve for curve in curves if curve.points):
        (line,) = axes.plot(
            *zip(*pareto_frontier([(p.x, p.y) for p in curve.points])), marker="o", label=curve.label
        )
        axes.scatter([p.x for p in curve.points], [p.y for p in curve.points], color=line.get_color(), alpha=0.35)
        for point in curve.points:
            axes.annotate(point.note, (point.x, point.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("tok/s/user (1 / median TPOT)")
    axes.set_ylabel("output tok/s per worker")
    axes.set_title("Throughput per worker against per-user speed")
    _finish(figure, axes, path)


def tpot_chart(curves: Sequence[Curve], path: Path) -> None:
    """TPOT p99 (y) against the request rate served (x), one line per curve."""
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for curve in (curve for curve in curves if curve.points):
        points = sorted(curve.points, key=lambda p: p.x)
        axes.plot([p.x for p in points], [p.y for p in points], marker="o", label=curve.label)
        for point in points:
            axes.annotate(point.note, (point.x, point.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("request throughput (req/s, measured)")
    axes.set_ylabel("TPOT p99 (ms)")
    axes.set_title("Time per output token under load")
    _finish(figure, axes, path)


def _finish(figure, axes, path: Path) -> None:
    axes.grid(True, alpha=0.3)
    axes.set_xlim(0, axes.get_xlim()[1] * 1.08)  # room for the last point's note
    axes.set_ylim(0, axes.get_ylim()[1] * 1.08)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
