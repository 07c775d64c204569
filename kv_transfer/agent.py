"""The transfer agent: one per process (per KV pool), both sender and receiver.

Protocol. Control messages are ucxx tagged messages (its Python API has no memory registration,
remote keys or RMA get, so a pull is a request and a response):

1. The receiver sends a `PullRequest` on `CONTROL_TAG` to the sender's worker address: request id,
   secret, the layer/head slice it wants, and how it will take the data.
2. The sender checks secret, TTL, allow-list and plan, and answers `PullResponse` ACCEPTED or
   REFUSED on the pull's response tag (the same answer for every kind of refusal).
3. Data, on one host (the sender's pool is shared memory, see `allocate_kv_pool`): the receiver
   maps the sender's pool read-only once and copies its selection straight into its own pool,
   converting as it copies, on its copier thread; then it sends `PullDone`, which releases the
   sender's pin. A one-sided read with a single copy and no staging. The copy starts with the
   request, not after the answer (the round trip is ~1-1.5 ms here, a 64 MB copy ~4 ms), and counts
   only if the answer is ACCEPTED. That is safe: a request stays pinned from publish to release
   and is never pinned again, so an acceptance proves the blocks were pinned for the whole copy;
   a pull that fails has its destination zeroed, so a refusal still reveals nothing.
   Data otherwise (across hosts, or a pool on a GPU): the sender sends message k on
   ``data_tag(pull_id, k)`` from its pool, or gathered into its staging buffer; the receiver posts
   receives ahead, into its pool or into staging and then converts. A send completes once the
   data is out, which is what releases the sender's pin.

Why not UCX's own shared memory: endpoints with UCX error handling off get sysv/CMA, but then a
peer dying mid-transfer makes UCX *abort the surviving process* (a CMA failure with no error
handler is logged as fatal: uct_base_iface_failure_log_level); that was reproduced here. With error
handling on, UCX only offers TCP. So every endpoint here has error handling on (a dead peer is
an error, never an abort) and the same-host data path is our own mapping of the peer's memfd, which
a dead peer cannot break. Liveness checks (/proc) and timeouts bound every wait on top of that.

Threads: ucxx's progress thread (C++) moves messages; one Python service thread per agent runs the
protocol, the staging copies and the release callbacks; a copier thread does same-host reads, in
copies as large as possible, without holding up the service thread. Public methods may be called
from any thread.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import enum
import heapq
import hmac
import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import ucxx._lib.libucxx as ucx_api  # noqa: E402
from ucxx._lib.arr import Array  # noqa: E402

from .config import TransferConfig  # noqa: E402
from .conversion import Route, copy_selection, gather, scatter, source_bytes  # noqa: E402
from .errors import (  # noqa: E402
    AgentClosedError, HandleExpiredError, KVTransferError, LayoutMismatchError, MalformedMessageError,
    PeerLostError, PeerNotAllowedError, PeerUnreachableError, PullRefusedError, TransferTimeoutError)
from .handle import SECRET_BYTES, KVHandle  # noqa: E402
from .layout import KVLayout, map_shared_pool, shared_pool_of  # noqa: E402
from .liveness import ProcessIdentity  # noqa: E402
from .metrics import TransferMetrics  # noqa: E402
from .staging import StagingArena  # noqa: E402
from .wire import (  # noqa: E402
    CONTROL_TAG, MAX_CONTROL_BYTES, MAX_MESSAGES, MAX_RESPONSE_BYTES, PullDone, PullRequest, PullResponse,
    PullStatus, data_tag, decode_control, response_tag)

log = logging.getLogger(__name__)

# Messages of one transfer in flight at once: enough to keep the progress thread busy between polls.
_MESSAGES_IN_FLIGHT = 16
# Messages are at most 1/_PIPELINE_DEPTH of the staging buffer, so that staged transfers pipeline.
_PIPELINE_DEPTH = 4
# Poll fast for this long after any activity: a pull request right after a publish is answered at once.
_BUSY_LINGER_S = 0.05
_LIVENESS_INTERVAL_S = 0.1
_MAX_CONTROL_PER_STEP = 64

_live_agents: weakref.WeakSet[TransferAgent] = weakref.WeakSet()


@atexit.register
def _close_live_agents() -> None:
    # ucxx must stop its progress thread before interpreter teardown, or destructors run there
    for agent in list(_live_agents):
        agent.close(timeout=1.0)


class ReleaseReason(str, enum.Enum):
    PULLED = "pulled"
    REVOKED = "revoked"
    EXPIRED = "expired"


ReleaseCallback = Callable[[str, ReleaseReason], None]


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


@dataclass(eq=False)
class _Message:
    """A message being sent or received; holds its buffer until UCX is done with it."""

    request: ucx_api.UCXRequest
    buffer: np.ndarray
    nbytes: int
    first_block: int = 0
    staged_at: int | None = None


# ---------------------------------------------------------------- sender state


@dataclass(eq=False)
class _Published:
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    secret: bytes
    deadline: float  # monotonic
    on_release: ReleaseCallback | None
    uncovered: np.ndarray  # [layers, heads]: True where no completed pull has taken it yet
    serving: int = 0
    ending: ReleaseReason | None = None  # released as soon as nothing is being served


@dataclass(eq=False)
class _Serve:
    """One accepted pull, on the sender: sending messages, or waiting for a reader's PullDone."""

    request: PullRequest
    published: _Published
    endpoint: ucx_api.UCXEndpoint
    block_bytes: int
    accepted_at: float
    started_at: float = 0.0
    progress_at: float = 0.0
    next_message: int = 0
    in_flight: list[_Message] = field(default_factory=list)
    bytes_sent: int = 0


# ---------------------------------------------------------------- receiver state


class _Phase(enum.Enum):
    WAITING = enum.auto()     # sequential receive: an earlier sender goes first
    REQUESTED = enum.auto()   # pull request sent, no answer yet
    RECEIVING = enum.auto()
    DRAINING = enum.auto()    # failed; waiting for receives already under way
    DONE = enum.auto()
    FAILED = enum.auto()


@dataclass(eq=False)
class _SubPull:
    """The part of a pull that comes from one sender (one handle)."""

    handle: KVHandle
    route: Route
    shared_pool: torch.Tensor | None = None  # the sender's pool, mapped, when read directly
    copy: concurrent.futures.Future | None = None  # the read of it, on the copier thread
    boundaries: list[int] = field(default_factory=list)
    in_place: bool = False
    pull_id: int = 0
    phase: _Phase = _Phase.WAITING
    endpoint: ucx_api.UCXEndpoint | None = None
    response: _Message | None = None
    deadline: float = 0.0
    accepted_at: float = 0.0
    progress_at: float = 0.0
    next_message: int = 0
    in_flight: list[_Message] = field(default_factory=list)
    bytes_received: int = 0
    error: KVTransferError | None = None


@dataclass(eq=False)
class _Pull:
    future: PullFuture
    subs: list[_SubPull]
    dest_block_ids: tuple[int, ...]
    num_tokens: int
    started: float


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
        self._host_pool = pool.device.type == "cpu"
        self._pool_bytes = pool.reshape(-1).view(torch.uint8).numpy() if self._host_pool else None
        self._shared = shared_pool_of(pool) if self.config.use_shared_memory else None
        staging_bytes = self.config.max_tokens_in_buffer * layout.bytes_per_token
        pin = not self._host_pool and torch.cuda.is_available()
        self._send_arena = StagingArena(staging_bytes, pin_memory=pin)
        self._recv_arena = StagingArena(staging_bytes, pin_memory=pin)
        self.max_message_bytes = max(1, self._send_arena.capacity // _PIPELINE_DEPTH)

        # USE_MT_MUTEX: a thread calling into UCX while the progress thread holds the worker sleeps
        # instead of spinning (on 2 cores, spinning took a core from the transfer).
        # TCP segments of 1 MiB instead of 8 KiB: 0.43 -> 1.4 GB/s for large messages here.
        self._context = ucx_api.UCXContext(
            config_dict={"NET_DEVICES": self.config.bind_interface, "USE_MT_MUTEX": "y",
                         "TCP_TX_SEG_SIZE": "1m", "TCP_RX_SEG_SIZE": "1m"},
            feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self._worker = ucx_api.UCXWorker(self._context)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self.address: bytes = self._worker.address.tobytes()
        self.process = ProcessIdentity.current()

        self._lock = threading.Lock()  # guards _published and _expiry
        self._published: dict[str, _Published] = {}
        self._expiry: list[tuple[float, int, _Published]] = []
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._close_deadline = 0.0
        self._closed = threading.Event()

        self._endpoints: dict[bytes, ucx_api.UCXEndpoint] = {}
        self._mapped_pools: dict[tuple[ProcessIdentity, int], torch.Tensor] = {}
        self._control_buffer = np.zeros(MAX_CONTROL_BYTES, dtype=np.uint8)
        self._control_rx = self._post_control_receive()
        self._control_tx: list[tuple[_Message, float]] = []
        self._serve_queue: collections.deque[_Serve] = collections.deque()
        self._serving: list[_Serve] = []
        self._readers: dict[tuple[bytes, int], _Serve] = {}
        self._abandoned: list[tuple[_Message, StagingArena | None]] = []
        self._pulls: list[_Pull] = []
        self._pull_ids = itertools.count(1)
        self._seq = itertools.count()
        self._busy_until = 0.0
        self._next_liveness = 0.0

        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kv-copy[{self.config.name}]")
        # The copier's helpers: it runs the reads and hands each helper a share of a large one.
        self._copy_helpers = (concurrent.futures.ThreadPoolExecutor(
            self.config.copy_threads - 1, thread_name_prefix=f"kv-copy-helper[{self.config.name}]")
            if self.config.copy_threads > 1 else None)
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
        block_ids = tuple(int(b) for b in block_ids)
        if num_tokens <= 0 or len(block_ids) != self.layout.blocks_for(num_tokens):
            raise ValueError(f"{num_tokens} tokens need {self.layout.blocks_for(max(num_tokens, 1))} "
                             f"blocks of {self.layout.block_size}, got {len(block_ids)}")
        if min(block_ids) < 0 or max(block_ids) >= self._pool.shape[0]:
            raise ValueError(f"block ids must be in [0, {self._pool.shape[0]})")
        ttl = self.config.handle_ttl_s
        published = _Published(request_id, block_ids, num_tokens, secrets.token_bytes(SECRET_BYTES),
                               time.monotonic() + ttl, on_release,
                               np.ones((self.layout.num_layers, self.layout.num_kv_heads), dtype=bool))
        with self._lock:
            if request_id in self._published:
                raise ValueError(f"request {request_id!r} is already published")
            self._published[request_id] = published
            heapq.heappush(self._expiry, (published.deadline, next(self._seq), published))
        self.metrics.add("handles_published")
        self.metrics.add("pinned_requests")
        self.metrics.add("pinned_blocks", len(block_ids))
        self._busy_until = time.monotonic() + _BUSY_LINGER_S
        return KVHandle(agent_name=self.config.name, agent_address=self.address, agent_process=self.process,
                        request_id=request_id, block_ids=block_ids, num_tokens=num_tokens, layout=self.layout,
                        secret=published.secret, expires_at=time.time() + ttl,
                        max_message_bytes=self.max_message_bytes, shared_pool=self._shared)

    def revoke(self, request_id: str) -> None:
        """Cancel a published request: released (reason "revoked") once no pull of it is in flight."""
        self._command(lambda: self._end(request_id, ReleaseReason.REVOKED))

    def pull(self, handles: KVHandle | Sequence[KVHandle], dest_block_ids: Sequence[int]) -> PullFuture:
        """Start pulling a request's KV into `dest_block_ids` of this agent's pool; never blocks.

        Give one handle per sender agent holding part of the request (e.g. both ranks of a TP2
        context instance); handles that hold nothing this pool needs are ignored. Together they must
        cover this pool's layers and heads exactly. Raises LayoutMismatchError at once for handles
        and destinations that cannot fit; every other failure ends up in the future.
        """
        self._check_open()
        if isinstance(handles, KVHandle):
            handles = [handles]
        pull = self._plan_pull(list(handles), tuple(int(b) for b in dest_block_ids))
        self.metrics.add("pulls_started")
        self.metrics.add("pulls_in_flight")
        self._command(lambda: self._start_pull(pull))
        return pull.future

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is in flight (up to `timeout`), release all published requests, stop."""
        if not self._closing:
            self._close_deadline = time.monotonic() + timeout
            self._closing = True
            self._wake.set()
        if threading.current_thread() is not self._thread:
            self._closed.wait(timeout + 5.0)

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ helpers for callers' threads

    def _check_open(self) -> None:
        if self._closing:
            raise AgentClosedError(f"agent {self.config.name} is closed")

    def _command(self, fn: Callable[[], None]) -> None:
        self._commands.append(fn)
        self._wake.set()

    def _reads_shared(self, handle: KVHandle) -> bool:
        return (self.config.use_shared_memory and handle.shared_pool is not None
                and handle.agent_process.is_local())

    def _plan_pull(self, handles: list[KVHandle], dest: tuple[int, ...]) -> _Pull:
        if not handles:
            raise LayoutMismatchError("pull needs at least one handle")
        first = handles[0]
        if any((h.request_id, h.num_tokens) != (first.request_id, first.num_tokens) for h in handles):
            raise LayoutMismatchError("handles of one pull must describe the same request and token count")
        if len(dest) != self.layout.blocks_for(first.num_tokens):
            raise LayoutMismatchError(f"{first.num_tokens} tokens need {self.layout.blocks_for(first.num_tokens)} "
                                      f"destination blocks of {self.layout.block_size}, got {len(dest)}")
        if len(set(dest)) != len(dest) or min(dest) < 0 or max(dest) >= self._pool.shape[0]:
            raise LayoutMismatchError(f"destination blocks must be distinct and in [0, {self._pool.shape[0]})")
        covered = np.zeros((self.layout.num_layers, self.layout.num_kv_heads), dtype=np.int32)
        subs = []
        for handle in handles:
            route = Route.between(handle.layout, self.layout)
            if route is None:
                continue
            (l0, l1), (h0, h1) = route.dst_layers, route.dst_heads
            covered[l0:l1, h0:h1] += 1
            if not self._reads_shared(handle):  # fail now, not in the future, when messages cannot work
                messages = len(route.plan(handle.block_ids, dest, self._message_limit(handle), in_place=True)) - 1
                if messages > MAX_MESSAGES:
                    raise LayoutMismatchError(f"the pull would take {messages} messages (at most {MAX_MESSAGES})")
            subs.append(_SubPull(handle, route))
        if not (covered == 1).all():
            raise LayoutMismatchError("the handles must cover this pool's layers and kv heads exactly once "
                                      f"(coverage per [layer, head]:\n{covered})")
        return _Pull(PullFuture(first.request_id), subs, dest, first.num_tokens, time.perf_counter())

    def _message_limit(self, handle: KVHandle) -> int:
        return min(self.max_message_bytes, handle.max_message_bytes)

    # ------------------------------------------------------------ service thread

    def _run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                worked = self._step(now)
                if self._closing and ((self._quiescent() and not self._control_tx) or now >= self._close_deadline):
                    break
                if worked:  # a state change often enables the next one: step again at once
                    self._busy_until = now + _BUSY_LINGER_S
                    continue
                busy = not self._quiescent() or self._control_tx
                interval = (self.config.poll_interval_s if busy or now < self._busy_until
                            else self.config.idle_poll_interval_s)
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
        worked |= self._receive_control(now)
        worked |= self._advance_serves(now)
        for pull in list(self._pulls):
            worked |= self._advance_pull(pull, now)
        worked |= self._reap(now)
        self._expire(now)
        if now >= self._next_liveness:
            self._next_liveness = now + _LIVENESS_INTERVAL_S
            self._check_liveness()
        return worked

    def _quiescent(self) -> bool:
        return not (self._serving or self._serve_queue or self._readers or self._pulls)

    def _shutdown(self) -> None:
        self._closing = True
        for serve in [*self._serve_queue, *self._serving, *self._readers.values()]:
            self._fail_serve(serve, "agent closed")
        self._copier.shutdown(wait=True)  # no read may write into the pool after close
        if self._copy_helpers is not None:
            self._copy_helpers.shutdown(wait=True)
        for pull in list(self._pulls):
            for sub in pull.subs:
                if sub.phase not in (_Phase.DONE, _Phase.FAILED):
                    sub.error = sub.error or AgentClosedError("agent closed during the pull")
                    sub.phase = _Phase.FAILED
            self._finish_pull(pull)
        with self._lock:
            remaining = list(self._published.values())
        for published in remaining:
            published.serving = 0
            self._end(published.request_id, ReleaseReason.REVOKED)
        for address in list(self._endpoints):
            self._drop_endpoint(address)
        self._worker.stop_progress_thread()
        _live_agents.discard(self)
        self._closed.set()

    def _endpoint(self, address: bytes) -> ucx_api.UCXEndpoint:
        """A cached endpoint, with UCX error handling on: a dead peer is then an error, not an abort."""
        endpoint = self._endpoints.get(address)
        if endpoint is None or not endpoint.alive:
            endpoint = self._worker.create_endpoint_from_worker_address(
                ucx_api.UCXAddress.create_from_buffer(address), True)
            self._endpoints[address] = endpoint
        return endpoint

    def _drop_endpoint(self, address: bytes) -> None:
        """Close an endpoint, which cancels its receives not yet matched."""
        endpoint = self._endpoints.pop(address, None)
        if endpoint is not None and endpoint.alive:  # closing a failed endpoint crashes ucxx 0.50
            endpoint.close()

    def _send_control(self, address: bytes, payload: bytes, tag: int, deadline: float) -> bool:
        """Send a control message; False if the peer cannot be reached (the caller decides what that means)."""
        buffer = np.frombuffer(bytearray(payload), dtype=np.uint8)
        try:
            request = self._endpoint(address).tag_send(Array(buffer), ucx_api.UCXXTag(tag))
        except ucx_api.UCXError as e:
            log.warning("cannot send to %s: %s", address[:8].hex(), e)
            return False
        self._control_tx.append((_Message(request, buffer, len(buffer)), deadline))
        return True

    def _post_control_receive(self) -> _Message:
        # Posted ahead rather than probed for: a probe takes the UCX worker lock, which the progress
        # thread may hold for a whole large message. A longer message fails as truncated.
        self._control_buffer.fill(0)
        request = self._worker.tag_recv(Array(self._control_buffer), ucx_api.UCXXTag(CONTROL_TAG))
        return _Message(request, self._control_buffer, MAX_CONTROL_BYTES)

    def _reap(self, now: float) -> bool:
        """Retire finished control sends and abandoned messages (returning their staging)."""
        worked = False
        for item in list(self._control_tx):
            message, deadline = item
            if message.request.completed or now >= deadline:
                self._control_tx.remove(item)
                worked = True
        for item in list(self._abandoned):
            message, arena = item
            if message.request.completed:
                self._abandoned.remove(item)
                if arena is not None:
                    self._free_staging(arena, message.staged_at, message.nbytes)
        return worked

    def _alloc_staging(self, arena: StagingArena, nbytes: int) -> int | None:
        offset = arena.alloc(nbytes)
        if offset is not None:
            self.metrics.set("staging_bytes_in_use", self._send_arena.in_use + self._recv_arena.in_use)
        return offset

    def _free_staging(self, arena: StagingArena, offset: int, nbytes: int) -> None:
        arena.free(offset, nbytes)
        self.metrics.set("staging_bytes_in_use", self._send_arena.in_use + self._recv_arena.in_use)

    def _check_liveness(self) -> None:
        for serve in [*self._serve_queue, *self._serving, *self._readers.values()]:
            if serve.request.receiver.is_alive() is False:
                self._fail_serve(serve, "receiver process is gone", peer_dead=True)
        for pull in self._pulls:
            for sub in pull.subs:
                if sub.handle.agent_process.is_alive() is not False:
                    continue
                if sub.shared_pool is not None and sub.phase is _Phase.RECEIVING:
                    continue  # accepted: the mapped pool outlives its process, the read finishes regardless
                if sub.phase is _Phase.REQUESTED:
                    self._fail_sub(sub, PeerUnreachableError(f"sender {sub.handle.agent_name} is gone"))
                elif sub.phase is _Phase.RECEIVING:
                    self._fail_sub(sub, PeerLostError(f"sender {sub.handle.agent_name} died mid-transfer"))
        for key in [k for k in self._mapped_pools if k[0].is_alive() is False]:
            del self._mapped_pools[key]  # unmapped once the last reader lets go

    # ------------------------------------------------------------ sender side

    def _end(self, request_id: str, reason: ReleaseReason) -> None:
        with self._lock:
            published = self._published.get(request_id)
        if published is not None:
            published.ending = published.ending or reason
            self._maybe_release(published)

    def _maybe_release(self, published: _Published) -> None:
        if published.ending is None or published.serving:
            return
        with self._lock:
            if self._published.get(published.request_id) is not published:
                return
            del self._published[published.request_id]
        self.metrics.add(f"handles_{published.ending.value}")
        self.metrics.add("pinned_requests", -1)
        self.metrics.add("pinned_blocks", -len(published.block_ids))
        if published.on_release is not None:
            try:
                published.on_release(published.request_id, published.ending)
            except Exception:
                self.metrics.add("release_callback_errors")
                log.exception("on_release callback for %r failed", published.request_id)

    def _expire(self, now: float) -> None:
        expired = []
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                expired.append(heapq.heappop(self._expiry)[2])
        for published in expired:
            published.ending = published.ending or ReleaseReason.EXPIRED
            self._maybe_release(published)

    def _receive_control(self, now: float) -> bool:
        worked = False
        for _ in range(_MAX_CONTROL_PER_STEP):
            if not self._control_rx.request.completed:
                break
            try:
                self._control_rx.request.check_error()
                message = decode_control(self._control_rx.buffer)
            except (ucx_api.UCXError, MalformedMessageError) as e:
                self.metrics.add("malformed_messages")
                log.warning("dropped a malformed control message: %s", e)
            else:
                if isinstance(message, PullDone):
                    self._on_pull_done(message, now)
                else:
                    self._on_pull_request(message, now)
            self._control_rx = self._post_control_receive()
            worked = True
        return worked

    def _on_pull_request(self, request: PullRequest, now: float) -> None:
        with self._lock:
            published = self._published.get(request.request_id)
        accepted = (published is not None and published.ending is None and now < published.deadline
                    and hmac.compare_digest(published.secret, request.secret)
                    and self.config.allows(request.receiver_name) and not self._closing)
        block_bytes = 0
        if accepted:
            block_bytes = self._check_plan(published, request)
            if not block_bytes:
                self.metrics.add("malformed_messages")
                accepted = False
        if not accepted:
            self.metrics.add("pulls_refused")  # counted before the answer can reach anyone
        status = PullStatus.ACCEPTED if accepted else PullStatus.REFUSED
        answered = self._send_control(request.reply_address, PullResponse(request.pull_id, status).to_bytes(),
                                      response_tag(request.pull_id), now + self.config.response_timeout_s)
        if accepted and not answered:
            self.metrics.add("serves_failed")
        if not (accepted and answered):
            return
        published.serving += 1
        serve = _Serve(request, published, self._endpoint(request.reply_address), block_bytes,
                       accepted_at=now, started_at=now)
        if request.shared:
            self._readers[(request.reply_address, request.pull_id)] = serve
        else:
            self._serve_queue.append(serve)
        self._count_serves()

    def _check_plan(self, published: _Published, request: PullRequest) -> int:
        """Bytes per block of the requested selection, or 0 if the request is inconsistent."""
        (l0, l1), (h0, h1), b = request.layers, request.heads, request.boundaries
        if not (0 <= l0 < l1 <= self.layout.num_layers and 0 <= h0 < h1 <= self.layout.num_kv_heads):
            return 0
        block_bytes = (l1 - l0) * 2 * self.layout.block_size * (h1 - h0) * self.layout.head_dim * self.layout.itemsize
        if request.shared:
            return block_bytes if self._shared is not None and not b else 0
        if len(b) < 2 or b[0] != 0 or b[-1] != len(published.block_ids) or len(b) - 1 > MAX_MESSAGES:
            return 0
        sizes = np.diff(np.asarray(b, dtype=np.int64))
        if (sizes <= 0).any() or sizes.max() * block_bytes > self.max_message_bytes:
            return 0
        return block_bytes

    def _on_pull_done(self, done: PullDone, now: float) -> None:
        serve = self._readers.get((done.reply_address, done.pull_id))
        if serve is None or not hmac.compare_digest(serve.published.secret, done.secret):
            return  # late (the serve already timed out) or not from the reader
        serve.bytes_sent = len(serve.published.block_ids) * serve.block_bytes
        self._complete_serve(serve, now)

    def _advance_serves(self, now: float) -> bool:
        worked = False
        while self._serve_queue and len(self._serving) < self.config.max_concurrent_sends:
            serve = self._serve_queue.popleft()
            serve.started_at = serve.progress_at = now
            self._serving.append(serve)
            worked = True
        for serve in [*self._serve_queue, *self._readers.values()]:
            if now - serve.accepted_at > self.config.transfer_timeout_s:
                self._fail_serve(serve, f"not done within {self.config.transfer_timeout_s:g} s")
        for serve in list(self._serving):
            worked |= self._pump_serve(serve, now)
        self._count_serves()
        return worked

    def _count_serves(self) -> None:
        self.metrics.set("serves_queued", len(self._serve_queue))
        self.metrics.set("serves_in_flight", len(self._serving) + len(self._readers))

    def _pump_serve(self, serve: _Serve, now: float) -> bool:
        worked = False
        for message in [m for m in serve.in_flight if m.request.completed]:
            serve.in_flight.remove(message)
            if message.staged_at is not None:
                self._free_staging(self._send_arena, message.staged_at, message.nbytes)
            try:
                message.request.check_error()
            except ucx_api.UCXError as e:
                self._fail_serve(serve, f"send failed: {e}")
                return True
            serve.bytes_sent += message.nbytes
            serve.progress_at = now
            worked = True
        request, published = serve.request, serve.published
        bounds = request.boundaries
        while serve.next_message < len(bounds) - 1 and len(serve.in_flight) < _MESSAGES_IN_FLIGHT:
            k = serve.next_message
            ids = published.block_ids[bounds[k]:bounds[k + 1]]
            nbytes = len(ids) * serve.block_bytes
            view, staged_at = None, None
            if self.config.zero_copy and self._host_pool:
                view = source_bytes(self._pool_bytes, self.layout, ids, request.layers, request.heads)
            if view is None:
                staged_at = self._alloc_staging(self._send_arena, nbytes)
                if staged_at is None:
                    break
                shape = (len(ids), request.layers[1] - request.layers[0], 2, self.layout.block_size,
                         request.heads[1] - request.heads[0], self.layout.head_dim)
                out = self._send_arena.tensor(staged_at, nbytes).view(self.layout.torch_dtype).view(shape)
                gather(self._pool, ids, request.layers, request.heads, out)
                view = self._send_arena.array(staged_at, nbytes)
                self.metrics.add("bytes_staged_sent", nbytes)
            try:
                send = serve.endpoint.tag_send(Array(view), ucx_api.UCXXTag(data_tag(request.pull_id, k)))
            except ucx_api.UCXError as e:
                if staged_at is not None:
                    self._free_staging(self._send_arena, staged_at, nbytes)
                self._fail_serve(serve, f"send failed: {e}")
                return True
            serve.in_flight.append(_Message(send, view, nbytes, staged_at=staged_at))
            serve.next_message += 1
            worked = True
        if serve.next_message == len(bounds) - 1 and not serve.in_flight:
            self._complete_serve(serve, now)
            return True
        if now - serve.progress_at > self.config.transfer_timeout_s:
            self._fail_serve(serve, f"no progress for {self.config.transfer_timeout_s:g} s")
            return True
        return worked

    def _retire(self, serve: _Serve) -> bool:
        """Take a serve out of whichever list holds it; False if it was already retired."""
        if serve in self._serving:
            self._serving.remove(serve)
        elif serve in self._serve_queue:
            self._serve_queue.remove(serve)
        elif self._readers.get((serve.request.reply_address, serve.request.pull_id)) is serve:
            del self._readers[(serve.request.reply_address, serve.request.pull_id)]
        else:
            return False
        serve.published.serving -= 1
        self._count_serves()
        return True

    def _complete_serve(self, serve: _Serve, now: float) -> None:
        if not self._retire(serve):
            return
        published = serve.published
        (l0, l1), (h0, h1) = serve.request.layers, serve.request.heads
        published.uncovered[l0:l1, h0:h1] = False
        self.metrics.add("pulls_served")
        self.metrics.add("bytes_sent", serve.bytes_sent)
        self.metrics.observe("serve_duration_s", now - serve.started_at)
        if not published.uncovered.any():
            published.ending = published.ending or ReleaseReason.PULLED
        self._maybe_release(published)

    def _fail_serve(self, serve: _Serve, reason: str, *, peer_dead: bool = False) -> None:
        """Give up on a serve. The request stays pinned (a retry may come) until revoked or expired.

        Sends UCX never completes are abandoned; their staging is reused only once they do complete,
        or at once if the receiver is dead (nobody will read it any more).
        """
        if not self._retire(serve):
            return
        log.warning("pull %d of %r by %s failed: %s", serve.request.pull_id, serve.request.request_id,
                    serve.request.receiver_name, reason)
        for message in serve.in_flight:
            if message.staged_at is not None and peer_dead:
                self._free_staging(self._send_arena, message.staged_at, message.nbytes)
            else:
                self._abandoned.append((message, self._send_arena if message.staged_at is not None else None))
        serve.in_flight.clear()
        if peer_dead:
            self._drop_endpoint(serve.request.reply_address)
        self.metrics.add("serves_failed")
        self._maybe_release(serve.published)

    # ------------------------------------------------------------ receiver side

    def _start_pull(self, pull: _Pull) -> None:
        self._pulls.append(pull)
        for i, sub in enumerate(pull.subs):
            if self.config.parallel_receive or i == 0:
                self._start_sub(sub, pull)

    def _start_sub(self, sub: _SubPull, pull: _Pull) -> None:
        handle = sub.handle
        sub.pull_id = next(self._pull_ids)
        if not self.config.allows(handle.agent_name):
            self._fail_sub(sub, PeerNotAllowedError(f"agent {handle.agent_name!r} is not an allowed peer"))
            return
        if handle.expired():
            self._fail_sub(sub, HandleExpiredError(f"handle for {handle.request_id!r} expired"))
            return
        if handle.agent_process.is_alive() is False:
            self._fail_sub(sub, PeerUnreachableError(f"sender {handle.agent_name} is gone"))
            return
        try:
            sub.endpoint = self._endpoint(handle.agent_address)
            if self._reads_shared(handle):
                sub.shared_pool = self._map_pool(handle)
            if sub.shared_pool is None:
                sub.in_place = self.config.zero_copy and self._host_pool and sub.route.lands_in_place()
                sub.boundaries = sub.route.plan(handle.block_ids, pull.dest_block_ids,
                                                self._message_limit(handle), sub.in_place)
        except ucx_api.UCXError as e:
            self._fail_sub(sub, PeerUnreachableError(f"cannot connect to {handle.agent_name}: {e}"))
            return
        except LayoutMismatchError as e:
            self._fail_sub(sub, e)
            return
        request = PullRequest(sub.pull_id, self.address, self.config.name, self.process, handle.request_id,
                              handle.secret, sub.route.src_layers, sub.route.src_heads,
                              shared=sub.shared_pool is not None,
                              boundaries=() if sub.shared_pool is not None else tuple(sub.boundaries))
        sub.phase = _Phase.REQUESTED
        sub.deadline = time.monotonic() + self.config.response_timeout_s
        buffer = np.zeros(MAX_RESPONSE_BYTES, dtype=np.uint8)
        try:
            response = sub.endpoint.tag_recv(Array(buffer), ucx_api.UCXXTag(response_tag(sub.pull_id)))
        except ucx_api.UCXError as e:
            self._fail_sub(sub, PeerUnreachableError(f"cannot reach {handle.agent_name}: {e}"))
            return
        sub.response = _Message(response, buffer, MAX_RESPONSE_BYTES)
        if not self._send_control(handle.agent_address, request.to_bytes(), CONTROL_TAG, sub.deadline):
            self._fail_sub(sub, PeerUnreachableError(f"cannot reach {handle.agent_name}"))
        elif sub.shared_pool is not None:  # read while the sender checks the request (see the module doc)
            sub.copy = self._copier.submit(copy_selection, sub.route, sub.shared_pool, handle.block_ids,
                                           self._pool, pull.dest_block_ids, pull.num_tokens,
                                           self._copy_helpers, self.config.copy_threads - 1)
            sub.copy.add_done_callback(lambda _: self._wake.set())  # release the sender's blocks at once

    def _map_pool(self, handle: KVHandle) -> torch.Tensor | None:
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

    def _advance_pull(self, pull: _Pull, now: float) -> bool:
        worked = False
        for i, sub in enumerate(pull.subs):
            if sub.phase is _Phase.WAITING and all(s.phase is _Phase.DONE for s in pull.subs[:i]):
                self._start_sub(sub, pull)
            if sub.phase is _Phase.REQUESTED:
                worked |= self._await_response(sub, now)
            if sub.shared_pool is not None:
                if sub.phase is _Phase.RECEIVING:
                    worked |= self._read_shared(sub, now)
                elif sub.phase is _Phase.DRAINING and sub.copy.done():
                    sub.phase = _Phase.FAILED
            elif sub.phase in (_Phase.RECEIVING, _Phase.DRAINING):
                worked |= self._receive(sub, pull, now)
        if any(s.phase is _Phase.FAILED for s in pull.subs):
            for sub in pull.subs:
                if sub.phase is _Phase.WAITING:  # sequential receive: the rest never starts
                    sub.phase = _Phase.FAILED
        if all(s.phase in (_Phase.DONE, _Phase.FAILED) for s in pull.subs):
            self._finish_pull(pull)
            return True
        return worked

    def _await_response(self, sub: _SubPull, now: float) -> bool:
        if sub.response.request.completed:
            try:
                sub.response.request.check_error()
                response = PullResponse.from_bytes(sub.response.buffer)
                if response.pull_id != sub.pull_id:
                    raise MalformedMessageError(f"response for pull {response.pull_id}, expected {sub.pull_id}")
            except ucx_api.UCXError as e:
                self._fail_sub(sub, self._receive_error(sub, e, before_data=True))
                return True
            except MalformedMessageError as e:
                self.metrics.add("malformed_messages")
                self._fail_sub(sub, MalformedMessageError(f"bad response from {sub.handle.agent_name}: {e}"))
                return True
            if response.status is PullStatus.REFUSED:
                self._fail_sub(sub, PullRefusedError(f"{sub.handle.agent_name} refused the pull of "
                                                     f"{sub.handle.request_id!r}"))
            else:
                sub.phase = _Phase.RECEIVING
                sub.accepted_at = sub.progress_at = now
            return True
        if now >= sub.deadline:
            self._fail_sub(sub, PeerUnreachableError(
                f"{sub.handle.agent_name} did not answer within {self.config.response_timeout_s:g} s"))
            return True
        return False

    def _read_shared(self, sub: _SubPull, now: float) -> bool:
        """Once the copier has read the mapped sender pool, tell the sender it may release the blocks."""
        if not sub.copy.done():
            return False
        if sub.copy.exception() is not None:
            self._fail_sub(sub, KVTransferError(f"reading the pool of {sub.handle.agent_name} failed: "
                                                f"{sub.copy.exception()!r}"))
        elif now - sub.accepted_at > self.config.transfer_timeout_s:  # the sender may have stopped waiting
            self._fail_sub(sub, TransferTimeoutError(
                f"reading from {sub.handle.agent_name} took over {self.config.transfer_timeout_s:g} s"))
        else:
            nbytes = len(sub.handle.block_ids) * sub.route.block_bytes
            sub.bytes_received = nbytes
            self.metrics.add("bytes_received", nbytes)
            self.metrics.add("bytes_read_shared", nbytes)
            # if the sender is gone there is nobody left to release the blocks: the data is still good
            done = PullDone(sub.pull_id, self.address, sub.handle.secret).to_bytes()
            self._send_control(sub.handle.agent_address, done, CONTROL_TAG, now + self.config.response_timeout_s)
            sub.phase = _Phase.DONE
        return True

    def _receive(self, sub: _SubPull, pull: _Pull, now: float) -> bool:
        worked = False
        route = sub.route
        for message in [m for m in sub.in_flight if m.request.completed]:
            sub.in_flight.remove(message)
            try:
                message.request.check_error()
                failed = None
            except ucx_api.UCXError as e:
                failed = e
            if failed is None and sub.phase is _Phase.RECEIVING and message.staged_at is not None:
                count = message.nbytes // route.block_bytes
                selection = self._recv_arena.tensor(message.staged_at, message.nbytes) \
                    .view(route.sender.torch_dtype).view(count, *route.block_shape)
                scatter(route, selection, message.first_block, self._pool, pull.dest_block_ids, pull.num_tokens)
            if message.staged_at is not None:
                self._free_staging(self._recv_arena, message.staged_at, message.nbytes)
            if failed is not None:
                self._fail_sub(sub, self._receive_error(sub, failed, before_data=False))
            else:
                sub.bytes_received += message.nbytes
                self.metrics.add("bytes_received", message.nbytes)
            sub.progress_at = now
            worked = True
        if sub.phase is _Phase.DRAINING:
            if not sub.in_flight:
                sub.phase = _Phase.FAILED
            elif now - sub.progress_at > self.config.transfer_timeout_s:
                # a receive UCX never completes (not seen here): give up on it
                self._abandoned.extend((m, self._recv_arena if m.staged_at is not None else None)
                                       for m in sub.in_flight)
                sub.in_flight.clear()
                sub.phase = _Phase.FAILED
            return worked
        worked |= self._post_receives(sub, pull)
        if sub.next_message == len(sub.boundaries) - 1 and not sub.in_flight:
            sub.phase = _Phase.DONE
            return True
        if now - sub.progress_at > self.config.transfer_timeout_s:
            self._fail_sub(sub, TransferTimeoutError(
                f"no data from {sub.handle.agent_name} for {self.config.transfer_timeout_s:g} s"))
            return True
        return worked

    def _post_receives(self, sub: _SubPull, pull: _Pull) -> bool:
        """Post receives for the next messages, within the in-flight and staging limits.

        Posted ahead, not probed for: UCX matches each message as it arrives and the progress
        thread chains the copies (probing measured 15-20% slower with many messages). The cost: a
        message shorter than planned is not detected (the Python API reports no received length);
        a longer one fails as truncated.
        """
        worked = False
        route = sub.route
        while sub.next_message < len(sub.boundaries) - 1 and len(sub.in_flight) < _MESSAGES_IN_FLIGHT:
            k = sub.next_message
            first, last = sub.boundaries[k], sub.boundaries[k + 1]
            nbytes = (last - first) * route.block_bytes
            staged_at = None
            if sub.in_place:
                start = pull.dest_block_ids[first] * self.layout.bytes_per_block
                target = self._pool_bytes[start:start + nbytes]
            else:
                staged_at = self._alloc_staging(self._recv_arena, nbytes)
                if staged_at is None:
                    break
                target = self._recv_arena.array(staged_at, nbytes)
                self.metrics.add("bytes_staged_received", nbytes)
            try:
                recv = sub.endpoint.tag_recv(Array(target), ucx_api.UCXXTag(data_tag(sub.pull_id, k)))
            except ucx_api.UCXError as e:
                if staged_at is not None:
                    self._free_staging(self._recv_arena, staged_at, nbytes)
                self._fail_sub(sub, PeerLostError(f"receiving from {sub.handle.agent_name} failed: {e}"))
                return True
            sub.in_flight.append(_Message(recv, target, nbytes, first_block=first, staged_at=staged_at))
            sub.next_message += 1
            worked = True
        return worked

    def _receive_error(self, sub: _SubPull, error: ucx_api.UCXError, *, before_data: bool) -> KVTransferError:
        name = sub.handle.agent_name
        if isinstance(error, ucx_api.UCXMessageTruncatedError):
            self.metrics.add("malformed_messages")
            return MalformedMessageError(f"a message from {name} was longer than planned")
        if before_data:  # no acceptance came: nothing says the blocks were ever pinned for us
            return PeerUnreachableError(f"no answer from {name}: {error}")
        if isinstance(error, ucx_api.UCXCanceledError):
            return PeerLostError(f"the connection to {name} was reset after a transfer from it failed")
        return PeerLostError(f"receiving from {name} failed: {error}")

    def _fail_sub(self, sub: _SubPull, error: KVTransferError) -> None:
        """Fail one sender's part of a pull; the pull ends once nothing can write its destination.

        Receives already posted would write into the destination whenever the data came: closing
        the endpoint cancels those not yet matched (a concurrent pull from the same sender fails
        with them: the peer is broken or too slow); receives and a shared-memory copy under way
        are waited for.
        """
        if sub.phase in (_Phase.DONE, _Phase.FAILED, _Phase.DRAINING):
            return
        sub.error = error
        awaiting_response = sub.response is not None and not sub.response.request.completed
        if sub.in_flight or awaiting_response:
            self._drop_endpoint(sub.handle.agent_address)
        if awaiting_response:  # its buffer is private: cancelled or not, it cannot hurt the pool
            self._abandoned.append((sub.response, None))
        copying = sub.copy is not None and not sub.copy.done()
        sub.phase = _Phase.DRAINING if sub.in_flight or copying else _Phase.FAILED
        sub.progress_at = time.monotonic()

    def _finish_pull(self, pull: _Pull) -> None:
        if pull in self._pulls:
            self._pulls.remove(pull)
        self.metrics.add("pulls_in_flight", -1)
        errors = [s.error for s in pull.subs if s.error is not None]
        if errors or not all(s.phase is _Phase.DONE for s in pull.subs):
            if any(s.copy is not None for s in pull.subs):  # a read ahead of a refusal leaves nothing behind
                self._pool[torch.tensor(pull.dest_block_ids)] = 0
            self.metrics.add("pulls_failed")
            pull.future.set_exception(errors[0] if errors else AgentClosedError("pull abandoned"))
            return
        duration = time.perf_counter() - pull.started
        self.metrics.add("pulls_completed")
        self.metrics.observe("pull_duration_s", duration)
        received = sum(s.bytes_received for s in pull.subs)
        pull.future.set_result(PullResult(pull.future.request_id, pull.num_tokens, received, duration))
