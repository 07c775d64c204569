"""The CPU's features, and the engine dtype they make best: read by the engine and by the launcher,
which must not load torch to print its help."""

from __future__ import annotations

import functools
from pathlib import Path

AUTO_DTYPE = "auto"
# CPU flags, as /proc/cpuinfo names them, that multiply bf16 natively: bf16 products there run
# several times faster than fp32 ones, and without them slower (benchmarks/RESULTS.md).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU feature flags (its first CPU's); empty where cpuinfo cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def auto_dtype(device: str, flags: frozenset[str]) -> str:
    """What `dtype: auto` is on `device` given the CPU's `flags`: bf16 on CUDA and on CPUs that
    multiply bf16 natively (AMX-BF16 or AVX512-BF16), fp32 on every other CPU."""
    if device.split(":")[0] == "cuda" or flags & BF16_CPU_FLAGS:
        return "bfloat16"
    return "float32"


def auto_dtype_reason(device: str, flags: frozenset[str]) -> str:
    """Why auto_dtype chose what it did, for the start-up log and `disagg-serve --help`."""
    if device.split(":")[0] == "cuda":
        return "a CUDA device"
    found = sorted(flags & BF16_CPU_FLAGS)
    return f"the CPU has {', '.join(found)}" if found else "the CPU has neither amx_bf16 nor avx512_bf16"
