"""Bounded host staging buffers, carved into page-aligned chunks (first fit)."""

from __future__ import annotations

import bisect

import numpy as np
import torch

from .layout import PAGE_SIZE, host_zeros
from .metrics import TransferMetrics


class StagingArena:
    """Allocated on first use: most agents only ever take the zero-copy path and need none.

    Pinned when the pool is on a GPU, so that device copies into and out of it are fast.
    Used by the service thread only.
    """

    def __init__(self, nbytes: int, *, pin_memory: bool) -> None:
        self.capacity = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        self._pin_memory = pin_memory
        self._tensor: torch.Tensor | None = None
        self._array: np.ndarray | None = None
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # sorted (start, end)
        self.in_use = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a chunk of `nbytes`, or None while not enough is free."""
        size = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        if size > self.capacity:
            raise ValueError(f"{nbytes} bytes never fit a {self.capacity}-byte staging buffer")
        for i, (start, end) in enumerate(self._free):
            if end - start >= size:
                if self._tensor is None:
                    self._tensor = host_zeros(self.capacity, pin_memory=self._pin_memory)
                    self._array = self._tensor.numpy()
                self._free[i] = (start + size, end)
                if start + size == end:
                    del self._free[i]
                self.in_use += size
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        i = bisect.bisect(self._free, (offset, offset + size))
        start, end = offset, offset + size
        if i < len(self._free) and self._free[i][0] == end:  # merge with the next free range
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:  # and with the previous one
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))
        self.in_use -= size

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._tensor[offset:offset + nbytes]

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        return self._array[offset:offset + nbytes]


class Staging:
    """An agent's two staging buffers, one for sending and one for receiving, with their use in the metrics."""

    def __init__(self, nbytes: int, *, pin_memory: bool, metrics: TransferMetrics) -> None:
        self.send = StagingArena(nbytes, pin_memory=pin_memory)
        self.recv = StagingArena(nbytes, pin_memory=pin_memory)
        self._metrics = metrics

    def alloc(self, arena: StagingArena, nbytes: int) -> int | None:
        offset = arena.alloc(nbytes)
        if offset is not None:
            self._metrics.set("staging_bytes_in_use", self.send.in_use + self.recv.in_use)
        return offset

    def free(self, arena: StagingArena, offset: int, nbytes: int) -> None:
        arena.free(offset, nbytes)
        self._metrics.set("staging_bytes_in_use", self.send.in_use + self.recv.in_use)
