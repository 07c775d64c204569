"""Where `disagg-serve` runs its engine instances: each on cores of its own, one engine thread a core.

When one server holds the whole deployment (modes disaggregated, aggregated and both), the cores
this process may use are split among the engine instances it loads, in order (context instances,
then generation, then aggregated; the first get the cores left over), and each model's
`cpu_cores` is set; with `num_threads` left empty an instance then runs one thread per core
(python_backend_utils/serving/placement.py). On 2 cores: disaggregated, context on core 0 and
generation on core 1; aggregated, one instance on both cores with 2 threads, as `llama-server -t 2`.
Nothing is pinned, and each instance runs one thread, where there are more instances than cores
or a CPU quota smaller than the cores (a container's --cpus: pinning would oversubscribe it), and
where any engine model's `cpu_cores` is given with --set (empty included): placement is then the
user's. The role modes (context-server, ...) pin nothing: several such servers may share a host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.repository import Setting, read_config

ENGINE_MODELS = ("context", "generation", "aggregated")
WHOLE_DEPLOYMENT_MODES = ("disaggregated", "aggregated", "both")
CORES = "cpu_cores"


@dataclass(frozen=True)
class Placement:
    """Each engine model's instances' cores, in instance order; empty when nothing is pinned."""

    cores: dict[str, list[list[int]]]
    reason: str  # why nothing is pinned, when nothing is

    def settings(self) -> tuple[Setting, ...]:
        return tuple(Setting(model, CORES, ";".join(",".join(map(str, s)) for s in sets))
                     for model, sets in self.cores.items())

    def describe(self) -> str:
        if not self.cores:
            return f"engine instances unpinned, one thread each ({self.reason})"
        return "engine instances: " + ", ".join(
            f"{model} #{index + 1} on core{'s' if len(s) > 1 else ''} {','.join(map(str, s))}"
            for model, sets in self.cores.items() for index, s in enumerate(sets)) + \
            " (one thread a core, unless num_threads is set)"


def split_cores(cores: Sequence[int], counts: dict[str, int]) -> Placement:
    """`counts` instances of each model over `cores`, in blocks of adjacent cores."""
    total = sum(counts.values())
    if total > len(cores):
        return Placement({}, f"{total} instances on {len(cores)} cores")
    share, extra = divmod(len(cores), total) if total else (0, 0)
    ordered, start, placed = sorted(cores), 0, {}
    for model, count in counts.items():
        sets = []
        for _ in range(count):
            size = share + (1 if extra > 0 else 0)
            extra -= 1
            sets.append(ordered[start:start + size])
            start += size
        placed[model] = sets
    return Placement({m: s for m, s in placed.items() if s}, "")


def instance_counts(repository: Path, models: Sequence[str]) -> dict[str, int]:
    """Engine instances each loaded engine model will have: its instance group's count, times its
    versions where it loads every version (context and generation: one version an instance)."""
    counts = {}
    for model in ENGINE_MODELS:
        config = repository / model / "config.pbtxt"
        if model not in models or not config.is_file():
            continue
        parsed = read_config(config)
        versions = [p for p in config.parent.iterdir() if p.is_dir() and p.name.isdigit()]
        loaded = len(versions) if parsed.version_policy.HasField("all") else 1
        counts[model] = sum(group.count or 1 for group in parsed.instance_group) or 1
        counts[model] *= loaded
    return counts


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2), or None if there is none."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def place_instances(repository: Path, models: Sequence[str], settings: Sequence[Setting]) -> Placement:
    """The placement for this server's engine models, given the user's --set `settings`."""
    counts = instance_counts(repository, models)
    if any(s.key == CORES and s.model in counts for s in settings):
        return Placement({}, "cpu_cores set by hand")
    cores = sorted(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    if limit is not None and limit < len(cores):
        return Placement({}, f"a CPU quota of {limit:g} cores, below the {len(cores)} cores this process may use")
    return split_cores(cores, counts)
