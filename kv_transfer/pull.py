"""What a pull is: its future, its parts (one per sender) and its plan, made on the caller's thread."""

from __future__ import annotations

import concurrent.futures
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import ucxx._lib.libucxx as ucx_api

from .conversion import Route
from .errors import KVTransferError, LayoutMismatchError
from .handle import KVHandle
from .pool import LocalPool
from .transport import Message
from .wire import MAX_MESSAGES


@dataclass(frozen=True)
class PullResult:
    request_id: str
    num_tokens: int
    bytes_received: int
    duration_s: float


class PullFuture(concurrent.futures.Future):
    """A pull in progress: poll `done()`, then `result()` (a PullResult) or `exception()`.

    It cannot be cancelled: the destination blocks may be written until it is done, so free or
    reuse them only after `done()`, whatever the outcome.
    """

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id
        self.set_running_or_notify_cancel()


class Phase(enum.Enum):
    WAITING = enum.auto()     # sequential receive: an earlier sender goes first
    REQUESTED = enum.auto()   # pull request sent, no answer yet
    RECEIVING = enum.auto()
    DRAINING = enum.auto()    # failed; waiting for receives already under way
    DONE = enum.auto()
    FAILED = enum.auto()


@dataclass(eq=False)
class SubPull:
    """The part of a pull that comes from one sender (one handle)."""

    handle: KVHandle
    route: Route
    shared_pool: torch.Tensor | None = None  # the sender's pool, mapped, when read directly
    copy: concurrent.futures.Future | None = None  # the read of it, on the copier thread
    boundaries: list[int] = field(default_factory=list)
    in_place: bool = False
    pull_id: int = 0
    phase: Phase = Phase.WAITING
    endpoint: ucx_api.UCXEndpoint | None = None
    response: Message | None = None
    deadline: float = 0.0
    accepted_at: float = 0.0
    progress_at: float = 0.0
    next_message: int = 0
    in_flight: list[Message] = field(default_factory=list)
    bytes_received: int = 0
    error: KVTransferError | None = None


@dataclass(eq=False)
class Pull:
    future: PullFuture
    subs: list[SubPull]
    dest_block_ids: tuple[int, ...]
    num_tokens: int
    started: float
    deadline: float = math.inf  # time.monotonic() past which the pull fails (see TransferAgent.pull)


def message_limit(pool: LocalPool, handle: KVHandle) -> int:
    """The largest message between this pool and the handle's sender: whichever limit is lower."""
    return min(pool.max_message_bytes, handle.max_message_bytes)


def plan_pull(pool: LocalPool, handles: list[KVHandle], dest: tuple[int, ...],
              reads_shared: Callable[[KVHandle], bool]) -> Pull:
    """Check that the handles and destination fit (else LayoutMismatchError) and plan the pull."""
    layout = pool.layout
    if not handles:
        raise LayoutMismatchError("pull needs at least one handle")
    first = handles[0]
    if any((h.request_id, h.num_tokens) != (first.request_id, first.num_tokens) for h in handles):
        raise LayoutMismatchError("handles of one pull must describe the same request and token count")
    if len(dest) != layout.blocks_for(first.num_tokens):
        raise LayoutMismatchError(f"{first.num_tokens} tokens need {layout.blocks_for(first.num_tokens)} "
                                  f"destination blocks of {layout.block_size}, got {len(dest)}")
    if len(set(dest)) != len(dest) or min(dest) < 0 or max(dest) >= pool.num_blocks:
        raise LayoutMismatchError(f"destination blocks must be distinct and in [0, {pool.num_blocks})")
    covered = np.zeros((layout.num_layers, layout.num_kv_heads), dtype=np.int32)
    subs = []
    for handle in handles:
        route = Route.between(handle.layout, layout)
        if route is None:
            continue
        (l0, l1), (h0, h1) = route.dst_layers, route.dst_heads
        covered[l0:l1, h0:h1] += 1
        if not reads_shared(handle):  # fail now, not in the future, when messages cannot work
            messages = len(route.plan(handle.block_ids, dest, message_limit(pool, handle), in_place=True)) - 1
            if messages > MAX_MESSAGES:
                raise LayoutMismatchError(f"the pull would take {messages} messages (at most {MAX_MESSAGES})")
        subs.append(SubPull(handle, route))
    if not (covered == 1).all():
        raise LayoutMismatchError("the handles must cover this pool's layers and kv heads exactly once "
                                  f"(coverage per [layer, head]:\n{covered})")
    return Pull(PullFuture(first.request_id), subs, dest, first.num_tokens, time.perf_counter())
