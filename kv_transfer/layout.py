"""KV pool layout descriptors and pool allocation.

A pool is one contiguous tensor, block-major:
``[num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]``,
so a block (all of its layers, K and V) is one contiguous run of bytes and runs of
consecutive block ids are contiguous too: that is what lets a transfer go without copies.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import mmap
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class KVLayout:
    """One pool's shape and the slice of the model it holds.

    ``layer_start``/``head_start`` place the pool in the full model (pipeline and tensor
    parallelism); ``total_layers``/``total_kv_heads`` describe the full model so that two
    layouts can be checked against each other. Totals default to "this pool is the whole model".
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"
    layer_start: int = 0
    head_start: int = 0
    total_layers: int | None = None
    total_kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.total_layers is None:
            object.__setattr__(self, "total_layers", self.layer_start + self.num_layers)
        if self.total_kv_heads is None:
            object.__setattr__(self, "total_kv_heads", self.head_start + self.num_kv_heads)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.layer_start < 0 or self.layer_end > self.total_layers:
            raise ValueError(f"layers [{self.layer_start}, {self.layer_end}) outside 0..{self.total_layers}")
        if self.head_start < 0 or self.head_end > self.total_kv_heads:
            raise ValueError(f"kv heads [{self.head_start}, {self.head_end}) outside 0..{self.total_kv_heads}")

    @property
    def layer_end(self) -> int:
        return self.layer_start + self.num_layers

    @property
    def head_end(self) -> int:
        return self.head_start + self.num_kv_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def shard(self, *, tp_size: int = 1, tp_rank: int = 0, layers: tuple[int, int] | None = None) -> KVLayout:
        """The layout of one tensor-parallel rank / pipeline stage of this full-model layout."""
        if self.layer_start or self.head_start or self.num_layers != self.total_layers \
                or self.num_kv_heads != self.total_kv_heads:
            raise ValueError("shard() takes a full-model layout")
        if self.num_kv_heads % tp_size or not 0 <= tp_rank < tp_size:
            raise ValueError(f"{self.num_kv_heads} kv heads cannot be split {tp_size} ways (rank {tp_rank})")
        heads = self.num_kv_heads // tp_size
        first, last = layers if layers is not None else (0, self.num_layers)
        return dataclasses.replace(self, num_layers=last - first, layer_start=first,
                                   num_kv_heads=heads, head_start=tp_rank * heads)

    def check_pool(self, pool: torch.Tensor) -> None:
        if pool.dim() != 6 or tuple(pool.shape[1:]) != self.block_shape:
            raise ValueError(f"pool shape {tuple(pool.shape)} is not [num_blocks, *{self.block_shape}]")
        if pool.dtype != self.torch_dtype:
            raise ValueError(f"pool dtype {pool.dtype} does not match layout dtype {self.dtype}")
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be contiguous (UCX sends non-contiguous views wrong)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        return cls(**data)


def host_zeros(nbytes: int, *, pin_memory: bool = False) -> torch.Tensor:
    """Zeroed uint8 host memory for staging, aligned for the fastest copies.

    An anonymous private mapping, 2 MiB-aligned and advised to use transparent huge pages
    (torch's allocator does not ask for them; memcpy was ~25% faster with them here), every page
    faulted in now rather than during a transfer. Pinned memory (for staging a GPU pool) comes from
    CUDA's allocator instead.
    """
    if pin_memory:
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    # private: a shared anonymous mapping is shmem, which gets no huge pages here
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(region, dtype=np.uint8)  # keeps the mapping alive
    offset = (-whole.ctypes.data) % HUGE_PAGE_SIZE
    array = whole[offset:offset + nbytes]
    array.fill(0)
    return torch.from_numpy(array)


@dataclass(frozen=True)
class SharedPool:
    """Where a pool lives in a memfd of its process, so that a peer on the same host can map it."""

    fd: int
    offset: int
    nbytes: int


# Fixed size for good; F_SEAL_SEAL: nobody can add or take off seals later.
POOL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_shared_regions: dict[int, tuple[int, int]] = {}  # base address -> (memfd, size)


def _forget_region(base: int, fd: int) -> None:
    _shared_regions.pop(base, None)
    os.close(fd)


def shared_host_zeros(nbytes: int) -> torch.Tensor:
    """Zeroed uint8 host memory in a memfd: peers on this host can map it and read it directly.

    Every page is faulted in now. Shared memory gets no transparent huge pages on this kernel
    (shmem_enabled=never): copies out of it measured ~90% of a huge-page memcpy.
    The memfd is mode 0600 (memfd_create makes it 0777), so only this user opens it through
    /proc/<pid>/fd, and sealed at its size, so nobody holding it can shrink it under the readers
    that mapped it (they would die of SIGBUS) or grow it.
    """
    fd = os.memfd_create("kv-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, POOL_SEALS)
    except OSError:
        os.close(fd)
        raise
    array = np.frombuffer(mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED), dtype=np.uint8)
    array.fill(0)
    base = array.ctypes.data
    _shared_regions[base] = (fd, nbytes)
    weakref.finalize(array, _forget_region, base, fd)
    return torch.from_numpy(array)


def shared_pool_of(tensor: torch.Tensor) -> SharedPool | None:
    """The memfd holding `tensor`, if it was allocated by `shared_host_zeros`."""
    if tensor.device.type != "cpu":
        return None
    start = tensor.data_ptr()
    nbytes = tensor.numel() * tensor.element_size()
    for base, (fd, size) in list(_shared_regions.items()):
        if base <= start and start + nbytes <= base + size:
            return SharedPool(fd, start - base, nbytes)
    return None


def map_shared_pool(pid: int, shared: SharedPool) -> torch.Tensor:
    """Map a peer's pool read-only (as UCX's posix transport does, through /proc/<pid>/fd)."""
    fd = os.open(f"/proc/{pid}/fd/{shared.fd}", os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < shared.offset + shared.nbytes:  # reading past the end would be SIGBUS
            raise OSError(f"/proc/{pid}/fd/{shared.fd} is smaller than the pool said to be in it")
        region = mmap.mmap(fd, shared.offset + shared.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    array = np.frombuffer(region, dtype=np.uint8)[shared.offset:]
    with warnings.catch_warnings():  # read-only on purpose: torch warns about writes we never make
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def allocate_kv_pool(layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A zeroed pool for `layout`. On the host it lives in shared memory, which lets agents on the
    same host read it directly (the fast path); a pool from elsewhere is moved through UCX."""
    shape = (num_blocks, *layout.block_shape)
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=layout.torch_dtype, device=device)
    return shared_host_zeros(num_blocks * layout.bytes_per_block).view(layout.torch_dtype).view(shape)
