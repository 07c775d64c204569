"""The transfer agent: one per process (per KV pool), both sender and receiver.

A pull is a request and a response, as ucxx tagged messages (transport.py): the receiver
(receiver.py) asks the sender for a slice of a published request, the sender (sender.py) checks
the request and answers. Then the data moves: on one host the receiver reads the sender's shared
pool itself (shared_read.py), otherwise the sender sends it as UCX messages.

Threads: ucxx's progress thread (C++) moves messages; one Python service thread per agent runs the
protocol, the staging copies and the release callbacks; a copier thread does same-host reads, in
copies as large as possible, without holding up the service thread. Public methods may be called
from any thread.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch

from .config import TransferConfig
from .errors import AgentClosedError
from .handle import KVHandle
from .layout import KVLayout
from .metrics import TransferMetrics
from .pool import LocalPool
from .pull import PullFuture, PullResult
from .receiver import Receiver
from .sender import ReleaseCallback, ReleaseReason, Sender
from .shared_read import SharedReader
from .staging import Staging
from .transport import Transport

__all__ = ["PullFuture", "PullResult", "ReleaseReason", "TransferAgent"]

log = logging.getLogger(__name__)

# Messages are at most 1/_PIPELINE_DEPTH of the staging buffer, so that staged transfers pipeline.
_PIPELINE_DEPTH = 4
# Poll fast for this long after any activity: a pull request right after a publish is answered at once.
_BUSY_LINGER_S = 0.05
_LIVENESS_INTERVAL_S = 0.1

_live_agents: weakref.WeakSet[TransferAgent] = weakref.WeakSet()


@atexit.register
def _close_live_agents() -> None:
    # ucxx must stop its progress thread before interpreter teardown, or destructors run there
    for agent in list(_live_agents):
        agent.close(timeout=1.0)


class TransferAgent:
    """Moves KV blocks between processes' pools: publishes requests (sender) and pulls them (receiver).

    ``pool`` is registered once and must stay allocated for the agent's life; it may live on any
    device. A host pool from `allocate_kv_pool` is shared memory, which same-host peers read
    directly; any other host pool is sent from and received into through UCX without copies when
    layouts allow; a pool on another device always goes through a pinned host staging buffer (the
    UCX build here has no GPU transports; none was tested).
    """

    def __init__(self, pool: torch.Tensor, layout: KVLayout, config: TransferConfig | None = None) -> None:
        layout.check_pool(pool)
        self.layout = layout
        self.config = config or TransferConfig()
        self.metrics = TransferMetrics()
        self._pool = pool
        staging_bytes = self.config.max_tokens_in_buffer * layout.bytes_per_token
        pin = pool.device.type != "cpu" and torch.cuda.is_available()
        staging = Staging(staging_bytes, pin_memory=pin, metrics=self.metrics)
        self.max_message_bytes = max(1, staging.send.capacity // _PIPELINE_DEPTH)
        local = LocalPool.register(pool, layout, share=self.config.use_shared_memory,
                                   max_message_bytes=self.max_message_bytes)
        self._transport = Transport(self.config, self.metrics, staging, in_use=self._peers_in_use)
        self.address: bytes = self._transport.address
        self.process = local.process

        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._close_deadline = 0.0
        self._closed = threading.Event()
        self._busy_until = 0.0
        self._next_liveness = 0.0
        self._sender = Sender(local, self.config, self.metrics, self._transport, staging, self._closing)
        self._receiver = Receiver(local, self.config, self.metrics, self._transport, staging,
                                  SharedReader(self.config), self._wake)
        self._thread = threading.Thread(target=self._run, name=f"kv-transfer[{self.config.name}]", daemon=True)
        self._thread.start()
        _live_agents.add(self)

    # ------------------------------------------------------------ public API

    def publish(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
                on_release: ReleaseCallback | None = None) -> KVHandle:
        """Pin a request's blocks for pulling and return the handle that lets one party pull them.

        ``on_release(request_id, reason)`` is called exactly once, from the agent's service thread,
        when the blocks may be freed: after the pulls completed (reason "pulled"; with several
        receivers, once all of this pool's layers and heads were pulled), after `revoke`, or when
        the TTL passed unpulled. Keep it short and non-blocking: hand the work to your own thread.
        """
        self._check_open()
        handle = self._sender.publish(request_id, block_ids, num_tokens, on_release)
        self._busy_until = time.monotonic() + _BUSY_LINGER_S
        return handle

    def revoke(self, request_id: str) -> None:
        """Cancel a published request: released (reason "revoked") once no pull of it is in flight."""
        self._command(lambda: self._sender.end(request_id, ReleaseReason.REVOKED))

    def pull(self, handles: KVHandle | Sequence[KVHandle], dest_block_ids: Sequence[int],
             timeout_s: float | None = None) -> PullFuture:
        """Start pulling a request's KV into `dest_block_ids` of this agent's pool; never blocks.

        Give one handle per sender agent holding part of the request (e.g. both ranks of a TP2
        context instance); handles that hold nothing this pool needs are ignored. Together they must
        cover this pool's layers and heads exactly. Raises LayoutMismatchError at once for handles
        and destinations that cannot fit; every other failure ends up in the future. A pull still
        running `timeout_s` after this call fails with TransferTimeoutError. Whatever the outcome,
        the future is done only once nothing writes the destination blocks any more.
        """
        self._check_open()
        if isinstance(handles, KVHandle):
            handles = [handles]
        pull = self._receiver.plan(list(handles), tuple(int(b) for b in dest_block_ids))
        if timeout_s is not None:
            pull.deadline = time.monotonic() + timeout_s
        self._command(lambda: self._receiver.start(pull))
        return pull.future

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is in flight (up to `timeout`), release all published requests, stop."""
        if not self._closing.is_set():
            self._close_deadline = time.monotonic() + timeout
            self._closing.set()
            self._wake.set()
        if threading.current_thread() is not self._thread:
            self._closed.wait(timeout + 5.0)

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # White-box tests read these (and `_pool`).
    @property
    def _pulls(self) -> list:
        return self._receiver.pulls

    @property
    def _context(self):
        return self._transport.context

    # ------------------------------------------------------------ helpers for callers' threads

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise AgentClosedError(f"agent {self.config.name} is closed")

    def _command(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the service thread, which owns all transfer state."""
        self._commands.append(fn)
        self._wake.set()

    # ------------------------------------------------------------ service thread

    def _run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                worked = self._step(now)
                if self._closing.is_set() and (self._idle() or now >= self._close_deadline):
                    break
                if worked:  # a state change often enables the next one: step again at once
                    self._busy_until = now + _BUSY_LINGER_S
                    continue
                busy = not self._idle() or now < self._busy_until
                interval = self.config.poll_interval_s if busy else self.config.idle_poll_interval_s
                if self._wake.wait(interval):
                    self._wake.clear()
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("kv-transfer service thread of %s crashed", self.config.name)
        finally:
            self._shutdown()

    def _step(self, now: float) -> bool:
        worked = False
        while self._commands:
            self._commands.popleft()()
            worked = True
        worked |= self._sender.receive_control(now)
        worked |= self._sender.advance(now)
        worked |= self._receiver.advance(now)
        worked |= self._transport.reap(now)
        self._sender.expire(now)
        if now >= self._next_liveness:
            self._next_liveness = now + _LIVENESS_INTERVAL_S
            self._sender.check_liveness()
            self._receiver.check_liveness()
        return worked

    def _peers_in_use(self) -> set[bytes]:
        return self._sender.peers() | self._receiver.peers()

    def _idle(self) -> bool:
        return self._sender.idle and self._receiver.idle and not self._transport.sending_control

    def _shutdown(self) -> None:
        self._closing.set()
        self._sender.fail_serves("agent closed")
        self._receiver.close()  # no read may write into the pool after close
        self._sender.release_all()
        self._transport.close()
        _live_agents.discard(self)
        self._closed.set()
