"""A shared-memory all-reduce for the tensor-parallel ranks of one CPU instance.

gloo sums a decode step's [batch, hidden] tensor between two processes in ~170 us over loopback
TCP, and a step makes two of them a layer (benchmarks/bench_parallel.py measured 57% of a TP2
decode step in them). Here each rank copies its tensor into its own slot of a region every rank
maps, publishes the call's number in its flag, waits until every flag has it, and sums the slots
in rank order: every rank gets the same bits. Slots come in two phases, taken by the call's
parity: a rank writes a phase again two calls later, after every rank has published the call in
between, so after every rank has read the phase. The region is a memfd the leader makes and its
ranks inherit; the flags' stores and loads are ordered by the C kernels (release/acquire, a fence
after the copy). Tensors larger than a slot, and CUDA, go through the process group.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from python_backend_utils.engine import cpu_kernels

# One flag a cache line, so that ranks spinning on them do not share lines they write.
FLAG_STRIDE = 8  # int64s
# A slot holds a prefill chunk's [tokens, hidden] partial sum up to this size; larger ones go through gloo,
# whose latency matters little next to their bytes.
MAX_SLOT_BYTES = 8 << 20
# Checks of the flags between two yields of the core (a rank waiting for a slower one on a shared core
# must let it run), and seconds between two checks of the other ranks' health.
SPINS = 2000
HEALTH_CHECK_S = 0.05


class PeerLostError(RuntimeError):
    """A rank stopped taking part in the all-reduce (it died, or passed the collective timeout)."""


def shared_memory_available(device: str) -> bool:
    """The C kernels hold the synchronisation: without them (or on CUDA) the process group sums."""
    return cpu_kernels.shared_memory_sync_applies() and torch.device(device).type == "cpu"


def slot_bytes(max_tokens: int, hidden_size: int) -> int:
    return min(max_tokens * hidden_size * 4, MAX_SLOT_BYTES)


def region_bytes(size: int, slot: int) -> int:
    return size * FLAG_STRIDE * 8 + 2 * size * slot


def create_region(size: int, slot: int) -> int:
    """The leader's memfd (zeroed: every flag at call 0), inheritable by the ranks it starts."""
    fd = os.memfd_create("disagg-tp-all-reduce", 0)
    os.ftruncate(fd, region_bytes(size, slot))
    os.set_inheritable(fd, True)
    return fd


class SharedMemoryAllReduce:
    """One rank's side; `calls` counts the all-reduces made so far (every rank makes the same ones)."""

    def __init__(self, fd: int, rank: int, size: int, slot: int, peers_alive: Callable[[], bool],
                 timeout_s: float) -> None:
        self.rank, self.size, self.slot = rank, size, slot
        self._peers_alive = peers_alive
        self._timeout_s = timeout_s
        self._region = mmap.mmap(fd, region_bytes(size, slot))  # kept for the process's life: views share it
        self._flags = np.frombuffer(self._region, dtype=np.int64, count=size * FLAG_STRIDE)
        self._flags_address = self._flags.ctypes.data
        flags_bytes = size * FLAG_STRIDE * 8
        self._slots = torch.frombuffer(self._region, dtype=torch.uint8, offset=flags_bytes, count=2 * size * slot)
        self.calls = 0

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.numel() * tensor.element_size() <= self.slot

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` (contiguous, fitting a slot) over the ranks, in place."""
        self.calls += 1
        nbytes = tensor.numel() * tensor.element_size()
        phase = (self.calls % 2) * self.size * self.slot
        starts = [phase + r * self.slot for r in range(self.size)]
        slots = [self._slots[start:start + nbytes].view(tensor.dtype).view(tensor.shape) for start in starts]
        cpu_kernels.shm_publish(slots[self.rank], tensor, self._flags_address + self.rank * FLAG_STRIDE * 8,
                                self.calls)
        self._wait(self.calls)
        tensor.copy_(slots[0])
        for other in slots[1:]:
            tensor.add_(other)
        return tensor

    def _wait(self, call: int) -> None:
        deadline = next_check = None
        while not cpu_kernels.shm_wait(self._flags_address, FLAG_STRIDE, self.size, call, SPINS):
            os.sched_yield()
            now = time.monotonic()
            if deadline is None:
                deadline, next_check = now + self._timeout_s, now + HEALTH_CHECK_S
            elif now >= next_check:
                if not self._peers_alive():
                    raise PeerLostError("a rank of the group exited")
                if now >= deadline:
                    raise PeerLostError(f"a rank of the group did not take part within {self._timeout_s:g} s")
                next_check = now + HEALTH_CHECK_S
