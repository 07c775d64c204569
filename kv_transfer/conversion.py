"""What one sender contributes to one receiver, how it is cut into messages, and the copies.

The *selection* is, for each of the request's blocks, the layers and kv heads the receiver holds,
in the sender's block size and dtype, laid out ``[n, layers, 2, block, heads, dim]``. On one host
the receiver reads it straight out of the sender's pool and converts as it copies. Through UCX
the sender sends it (a head subset gathered on the sender, so each receiver rank gets exactly its
heads: TP1 -> TP2) and the receiver converts (block size, dtype, placement among its own layers
and heads; a TP2 -> TP1 head merge is placed from each sender in turn).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import LayoutMismatchError
from .layout import KVLayout

try:
    from . import _stream_copy
except ImportError:  # built without a C compiler (see pyproject.toml): numpy's copy
    _stream_copy = None


def _runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(ids):
        if runs and block == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, block, 1))
    return runs


def is_run(ids: Sequence[int]) -> bool:
    return all(b == ids[0] + k for k, b in enumerate(ids))


@dataclass(frozen=True)
class Route:
    """The overlap of a sender's and a receiver's slice of the model, in each side's indices."""

    sender: KVLayout
    receiver: KVLayout
    layers: tuple[int, int]  # global layer range moved
    heads: tuple[int, int]   # global kv-head range moved

    @staticmethod
    def between(sender: KVLayout, receiver: KVLayout) -> Route | None:
        """None when the two slices share nothing (the handle is not for this receiver)."""
        if (sender.total_layers, sender.total_kv_heads, sender.head_dim) != \
                (receiver.total_layers, receiver.total_kv_heads, receiver.head_dim):
            raise LayoutMismatchError(f"sender {sender} and receiver {receiver} hold different models")
        layers = (max(sender.layer_start, receiver.layer_start), min(sender.layer_end, receiver.layer_end))
        heads = (max(sender.head_start, receiver.head_start), min(sender.head_end, receiver.head_end))
        if layers[0] >= layers[1] or heads[0] >= heads[1]:
            return None
        return Route(sender, receiver, layers, heads)

    @property
    def src_layers(self) -> tuple[int, int]:
        return self.layers[0] - self.sender.layer_start, self.layers[1] - self.sender.layer_start

    @property
    def src_heads(self) -> tuple[int, int]:
        return self.heads[0] - self.sender.head_start, self.heads[1] - self.sender.head_start

    @property
    def dst_layers(self) -> tuple[int, int]:
        return self.layers[0] - self.receiver.layer_start, self.layers[1] - self.receiver.layer_start

    @property
    def dst_heads(self) -> tuple[int, int]:
        return self.heads[0] - self.receiver.head_start, self.heads[1] - self.receiver.head_start

    @functools.cached_property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block of the selection, as sent."""
        s = self.sender
        return (self.layers[1] - self.layers[0], 2, s.block_size, self.heads[1] - self.heads[0], s.head_dim)

    @functools.cached_property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * self.sender.itemsize

    def lands_in_place(self) -> bool:
        """A selection block is byte for byte a receiver block: receive straight into the pool."""
        s, r = self.sender, self.receiver
        return (s.block_size == r.block_size and s.dtype == r.dtype
                and self.layers == (r.layer_start, r.layer_end) and self.heads == (r.head_start, r.head_end))

    def plan(self, src_ids: Sequence[int], dst_ids: Sequence[int], max_message_bytes: int,
             in_place: bool) -> list[int]:
        """Message boundaries over the request's blocks: message k is blocks [b[k], b[k+1]).

        Messages are cut where the sender's bytes stop being contiguous (so it can send without
        a copy), where the destination blocks stop being consecutive (when receiving in place),
        and at `max_message_bytes`.
        """
        if self.block_bytes > max_message_bytes:
            raise LayoutMismatchError(
                f"one sender block ({self.block_bytes} bytes) exceeds the message limit "
                f"({max_message_bytes} bytes): raise max_tokens_in_buffer")
        whole_blocks = self.block_shape[0] == self.sender.num_layers
        all_heads = self.block_shape[3] == self.sender.num_kv_heads
        boundaries, size = [0], 0
        for i in range(len(src_ids)):
            if i > boundaries[-1] and (
                    size + self.block_bytes > max_message_bytes
                    or (all_heads and not whole_blocks)
                    or (all_heads and src_ids[i] != src_ids[i - 1] + 1)
                    or (in_place and dst_ids[i] != dst_ids[i - 1] + 1)):
                boundaries.append(i)
                size = 0
            size += self.block_bytes
        boundaries.append(len(src_ids))
        return boundaries


def source_bytes(pool_bytes: np.ndarray, layout: KVLayout, block_ids: Sequence[int],
                 layers: tuple[int, int], heads: tuple[int, int]) -> np.ndarray | None:
    """The selection of `block_ids` as a view of the pool, or None when it is not contiguous there."""
    if heads != (0, layout.num_kv_heads) or not is_run(block_ids):
        return None
    start = block_ids[0] * layout.bytes_per_block
    if layers == (0, layout.num_layers):
        return pool_bytes[start:start + len(block_ids) * layout.bytes_per_block]
    if len(block_ids) == 1:
        per_layer = layout.bytes_per_block // layout.num_layers
        return pool_bytes[start + layers[0] * per_layer:start + layers[1] * per_layer]
    return None


def gather(pool: torch.Tensor, block_ids: Sequence[int], layers: tuple[int, int], heads: tuple[int, int],
           out: torch.Tensor) -> None:
    """Copy the selection of `block_ids` into `out` ([n, layers, 2, block, heads, dim]), one copy per run."""
    for pos, first, length in _runs(block_ids):
        out[pos:pos + length].copy_(pool[first:first + length, layers[0]:layers[1], :, :, heads[0]:heads[1]])


def scatter(route: Route, selection: torch.Tensor, first_block: int, pool: torch.Tensor,
            dst_ids: Sequence[int], num_tokens: int) -> None:
    """Place received selection blocks (request blocks from `first_block` on) into the receiver pool.

    One copy per (sender block, receiver block) overlap; `copy_` converts the dtype.
    """
    bs_src, bs_dst = route.sender.block_size, route.receiver.block_size
    (l0, l1), (h0, h1) = route.dst_layers, route.dst_heads
    for k in range(selection.shape[0]):
        start = (first_block + k) * bs_src
        end = min(start + bs_src, num_tokens)
        t = start
        while t < end:
            j, slot = divmod(t, bs_dst)
            n = min(end - t, bs_dst - slot)
            pool[dst_ids[j], l0:l1, :, slot:slot + n, h0:h1].copy_(selection[k, :, :, t - start:t - start + n])
            t += n


# Below this, a run is copied by one thread: splitting costs more than it gains.
PARALLEL_COPY_MIN_BYTES = 4 << 20
# From this size a copy bypasses the caches (`_stream_copy`): 1.3-1.7x faster from 4 MiB with cold
# caches here, and what is copied is larger than what the caches would keep of it anyway.
STREAM_COPY_MIN_BYTES = 4 << 20
_COPY_ALIGNMENT = 4096


def copy_bytes(dst: np.ndarray, src: np.ndarray, bypass_caches: bool) -> None:
    """Copy a contiguous byte range (the GIL is released), with non-temporal stores if asked and
    the extension is built."""
    if bypass_caches and _stream_copy is not None:
        _stream_copy.copy(dst, src)
    else:
        np.copyto(dst, src)


def parallel_copy(dst: np.ndarray, src: np.ndarray, helpers: concurrent.futures.Executor | None,
                  num_helpers: int) -> None:
    """Copy one contiguous byte range, this thread and up to `num_helpers` helper threads taking a
    page-aligned share each."""
    bypass_caches = src.nbytes >= STREAM_COPY_MIN_BYTES
    shares = num_helpers + 1 if helpers is not None and src.nbytes >= PARALLEL_COPY_MIN_BYTES else 1
    if shares == 1:
        copy_bytes(dst, src, bypass_caches)
        return
    share = -(-src.nbytes // shares // _COPY_ALIGNMENT) * _COPY_ALIGNMENT
    bounds = [(start, min(start + share, src.nbytes)) for start in range(0, src.nbytes, share)]
    others = [helpers.submit(copy_bytes, dst[a:b], src[a:b], bypass_caches) for a, b in bounds[1:]]
    a, b = bounds[0]
    copy_bytes(dst[a:b], src[a:b], bypass_caches)
    for other in others:
        other.result()


def copy_selection(route: Route, src_pool: torch.Tensor, src_ids: Sequence[int], dst_pool: torch.Tensor,
                   dst_ids: Sequence[int], num_tokens: int,
                   helpers: concurrent.futures.Executor | None = None, num_helpers: int = 0) -> None:
    """Copy a request's selection straight out of a sender pool (mapped shared memory).

    When a selection block is byte for byte a receiver block, each run is one copy, as large as
    the run (split among the helper threads and bypassing the caches when large: `copy_bytes`).
    Otherwise the blocks are placed token by token (`scatter`), converting. Either way the only
    copy, no staging.
    """
    (l0, l1), (h0, h1) = route.src_layers, route.src_heads
    in_place = route.lands_in_place()
    for pos, block, length in _runs(src_ids):
        selection = src_pool[block:block + length, l0:l1, :, :, h0:h1]
        if in_place and is_run(dst_ids[pos:pos + length]):
            target = dst_pool[dst_ids[pos]:dst_ids[pos] + length]
            if selection.is_contiguous() and target.device.type == "cpu":
                parallel_copy(target.view(torch.uint8).numpy().reshape(-1),
                              selection.view(torch.uint8).numpy().reshape(-1), helpers, num_helpers)
            else:
                target.copy_(selection)
        else:
            scatter(route, selection, pos, dst_pool, dst_ids, num_tokens)
