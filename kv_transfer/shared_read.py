"""Same-host reads: the receiver maps the sender's pool and copies its selection itself.

The sender's pool is shared memory (see `allocate_kv_pool`): the receiver maps it read-only once
and copies its selection straight into its own pool, converting as it copies, on its copier
thread; then it sends `PullDone`, which releases the sender's pin. A one-sided read with a single
copy and no staging. The copy starts with the request, not after the answer (the round trip is
of the order of a large copy: kv_transfer/README.md has the figures), and counts only if the
answer is ACCEPTED. That is safe: a
request stays pinned from publish to release and is never pinned again, so an acceptance proves
the blocks were pinned for the whole copy; a pull that fails has its destination zeroed, so a
refusal still reveals nothing.

Why not UCX's own shared memory: endpoints with UCX error handling off get sysv/CMA, but then a
peer dying mid-transfer makes UCX *abort the surviving process* (a CMA failure with no error
handler is logged as fatal: uct_base_iface_failure_log_level); that was reproduced here. With error
handling on, UCX only offers TCP. So every endpoint here has error handling on (a dead peer is
an error, never an abort) and the same-host data path is our own mapping of the peer's memfd, which
a dead peer cannot break. Liveness checks (/proc) and timeouts bound every wait on top of that.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence

import torch

from .config import TransferConfig
from .conversion import Route, copy_selection
from .handle import KVHandle
from .layout import map_shared_pool
from .liveness import ProcessIdentity

log = logging.getLogger(__name__)


class SharedReader:
    """Maps senders' pools, once per pool, and reads them on the copier thread.

    The copier thread does the reads in copies as large as possible, without holding up the
    service thread; the rest is used by the service thread only.
    """

    def __init__(self, config: TransferConfig) -> None:
        self._config = config
        self._mapped_pools: dict[tuple[ProcessIdentity, int], torch.Tensor] = {}
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kv-copy[{config.name}]")
        # The copier's helpers: it runs the reads and hands each helper a share of a large one.
        self._copy_helpers = (concurrent.futures.ThreadPoolExecutor(
            config.copy_threads - 1, thread_name_prefix=f"kv-copy-helper[{config.name}]")
            if config.copy_threads > 1 else None)

    def can_read(self, handle: KVHandle) -> bool:
        """Whether to try reading the sender's pool directly; any thread may ask."""
        return (self._config.use_shared_memory and handle.shared_pool is not None
                and handle.agent_process.is_local())

    def map_pool(self, handle: KVHandle) -> torch.Tensor | None:
        """The sender's pool mapped read-only (once per sender pool), or None if it cannot be mapped."""
        key = (handle.agent_process, handle.shared_pool.fd)
        pool = self._mapped_pools.get(key)
        if pool is None:
            layout = handle.layout
            if handle.shared_pool.nbytes % layout.bytes_per_block:
                return None
            try:
                raw = map_shared_pool(handle.agent_process.pid, handle.shared_pool)
            except (OSError, ValueError) as e:  # e.g. not allowed to open /proc/<pid>/fd: use messages
                log.info("cannot map the pool of %s (%s): pulling through UCX", handle.agent_name, e)
                return None
            pool = raw.view(layout.torch_dtype).view(-1, *layout.block_shape)
            self._mapped_pools[key] = pool
        return pool if max(handle.block_ids) < pool.shape[0] else None

    def read(self, route: Route, src_pool: torch.Tensor, src_ids: Sequence[int], dst_pool: torch.Tensor,
             dst_ids: Sequence[int], num_tokens: int,
             on_done: Callable[[concurrent.futures.Future], None]) -> concurrent.futures.Future:
        """Copy a selection out of a mapped pool on the copier thread; `on_done` runs when it ends."""
        copy = self._copier.submit(copy_selection, route, src_pool, src_ids, dst_pool, dst_ids, num_tokens,
                                   self._copy_helpers, self._config.copy_threads - 1)
        copy.add_done_callback(on_done)
        return copy

    def forget_dead(self) -> None:
        for key in [k for k in self._mapped_pools if k[0].is_alive() is False]:
            del self._mapped_pools[key]  # unmapped once the last reader lets go

    def close(self) -> None:
        """Wait for the reads under way: no read may write into the pool after close."""
        self._copier.shutdown(wait=True)
        if self._copy_helpers is not None:
            self._copy_helpers.shutdown(wait=True)
