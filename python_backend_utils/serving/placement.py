"""Pin each engine instance to its own CPU cores.

Instances that share a machine would otherwise share cores, and a prefill on one would slow
the decode on another: exactly the interference disaggregation removes. The `cpu_cores`
setting lists one core set per instance, separated by ";" (e.g. "0;1" or "0-3;4-7"), in
instance order: version 1's instances first, then version 2's (instances of this project's
context and generation groups are versions, those of `aggregated` are its instance group).
An empty `num_threads` gives a pinned instance one engine thread per core it has, and an unpinned
one a single thread: unpinned instances share the machine's cores, where two busy processes with
two threads each collapsed (decode steps from 156 ms to seconds, on 2 cores).
"""

from __future__ import annotations

import json
import os

from python_backend_utils.engine.config import ConfigError


def parse_core_sets(text: str) -> list[frozenset[int]]:
    """ "0-1;2,3" -> [{0, 1}, {2, 3}]; "" -> [] (no pinning)."""
    core_sets = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        cores: set[int] = set()
        for item in part.split(","):
            low, dash, high = item.strip().partition("-")
            try:
                first, last = int(low), int(high if dash else low)
            except ValueError:
                raise ConfigError(f"cpu_cores={text!r}: {item!r} is not a core number or a range like 0-3") from None
            if first < 0 or last < first:
                raise ConfigError(f"cpu_cores={text!r}: {item!r} is not a valid core range")
            cores.update(range(first, last + 1))
        core_sets.append(frozenset(cores))
    return core_sets


def instance_index(version: int, instance_name: str, instances_per_version: int) -> int:
    """Position of this instance among all of the model's instances (Triton names them <model>_<group>_<k>)."""
    within = int(instance_name.rsplit("_", 1)[1]) if instance_name.rsplit("_", 1)[-1].isdigit() else 0
    return (version - 1) * instances_per_version + within


def cores_for(core_sets: list[frozenset[int]], index: int) -> frozenset[int] | None:
    if not core_sets:
        return None
    if index >= len(core_sets):
        raise ConfigError(
            f"cpu_cores lists {len(core_sets)} core set(s) but this is instance {index + 1}: give one per instance"
        )
    allowed = os.sched_getaffinity(0)
    if not core_sets[index] <= allowed:
        raise ConfigError(
            f"cpu_cores: cores {sorted(core_sets[index] - allowed)} are not available here (allowed: {sorted(allowed)})"
        )
    return core_sets[index]


def pin_process(cores: frozenset[int]) -> None:
    """Every thread of this process (torch's pools included), and threads started later, run on `cores`."""
    for thread_id in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread_id), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


def threads_for(cores: frozenset[int] | None) -> int:
    """The engine threads an instance gets when `num_threads` is left empty."""
    return len(cores) if cores else 1


def pin_instance(args: dict) -> frozenset[int] | None:
    """Pin this Triton model instance per its `cpu_cores` parameter; the cores, or None if unpinned."""
    config = json.loads(args["model_config"])
    text = config.get("parameters", {}).get("cpu_cores", {}).get("string_value", "")
    per_version = sum(group.get("count", 1) for group in config.get("instance_group", [{}])) or 1
    index = instance_index(int(args["model_version"]), args["model_instance_name"], per_version)
    cores = cores_for(parse_core_sets(text), index)
    if cores is not None:
        pin_process(cores)
    return cores
