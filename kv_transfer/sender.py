"""The sender side: published requests, their pins and TTLs, and serving pulls of them.

A request is pinned from `publish` until it is released (pulled, revoked or expired) and never
pinned again. A `PullRequest` arrives on `CONTROL_TAG`, authenticated (transport.py). Only a
request with the secret of a request published here (still pinned, or released early and not yet
past its TTL) is answered, since answering means connecting to the reply address the request
names: anything else is counted and dropped unanswered, so nobody without a handle can make this
agent connect anywhere. For the holder of a handle, the sender checks TTL, allow-list and plan,
and answers `PullResponse` ACCEPTED or REFUSED on the pull's response tag (the same answer for
every kind of refusal). Then, for a same-host reader (shared_read.py), it waits for the
reader's `PullDone`, which releases the pin. Otherwise (across hosts, or a pool on a GPU) it sends
message k on ``data_tag(pull_id, k)`` from its pool, or gathered into its staging buffer. A send
completes once the data is out, which is what releases the pin.
"""

from __future__ import annotations

import collections
import enum
import heapq
import hmac
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ucxx._lib.libucxx as ucx_api
from ucxx._lib.arr import Array

from .config import TransferConfig
from .conversion import gather, source_bytes
from .errors import MalformedMessageError
from .handle import SECRET_BYTES, KVHandle
from .metrics import TransferMetrics
from .pool import LocalPool
from .staging import Staging
from .transport import MESSAGES_IN_FLIGHT, Message, Transport
from .wire import (
    MAX_MESSAGES,
    ControlMessage,
    PullAbandoned,
    PullDone,
    PullRequest,
    PullResponse,
    PullStatus,
    data_tag,
    response_tag,
)

log = logging.getLogger(__name__)


class ReleaseReason(str, enum.Enum):
    PULLED = "pulled"
    REVOKED = "revoked"
    EXPIRED = "expired"
    ABANDONED = "abandoned"  # its pull failed and the receiver prefills instead


ReleaseCallback = Callable[[str, ReleaseReason], None]


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
    """One accepted pull: sending messages, or waiting for a reader's PullDone."""

    request: PullRequest
    published: _Published
    endpoint: ucx_api.UCXEndpoint
    block_bytes: int
    accepted_at: float
    started_at: float = 0.0
    progress_at: float = 0.0
    next_message: int = 0
    in_flight: list[Message] = field(default_factory=list)
    bytes_sent: int = 0


class Sender:
    """Pins published requests and serves pulls of them.

    `publish` runs on callers' threads (the published requests are under `_lock`); everything else
    on the agent's service thread.
    """

    def __init__(self, pool: LocalPool, config: TransferConfig, metrics: TransferMetrics, transport: Transport,
                 staging: Staging, closing: threading.Event) -> None:
        self._pool = pool
        self._layout = pool.layout
        self._config = config
        self._metrics = metrics
        self._transport = transport
        self._staging = staging
        self._closing = closing  # set: refuse every pull
        self._lock = threading.Lock()  # guards _published, _released and _expiry
        self._published: dict[str, _Published] = {}
        self._released: dict[str, _Published] = {}  # released before their TTL: refused, not ignored
        self._expiry: list[tuple[float, int, _Published]] = []
        self._seq = itertools.count()
        self._serve_queue: collections.deque[_Serve] = collections.deque()
        self._serving: list[_Serve] = []
        self._readers: dict[tuple[bytes, int], _Serve] = {}

    @property
    def idle(self) -> bool:
        return not (self._serving or self._serve_queue or self._readers)

    def peers(self) -> set[bytes]:
        """The receivers that serves under way send to."""
        return {s.request.reply_address for s in [*self._serve_queue, *self._serving, *self._readers.values()]}

    def publish(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
                on_release: ReleaseCallback | None) -> KVHandle:
        block_ids = tuple(int(b) for b in block_ids)
        if num_tokens <= 0 or len(block_ids) != self._layout.blocks_for(num_tokens):
            raise ValueError(f"{num_tokens} tokens need {self._layout.blocks_for(max(num_tokens, 1))} "
                             f"blocks of {self._layout.block_size}, got {len(block_ids)}")
        if min(block_ids) < 0 or max(block_ids) >= self._pool.num_blocks:
            raise ValueError(f"block ids must be in [0, {self._pool.num_blocks})")
        ttl = self._config.handle_ttl_s
        published = _Published(request_id, block_ids, num_tokens, secrets.token_bytes(SECRET_BYTES),
                               time.monotonic() + ttl, on_release,
                               np.ones((self._layout.num_layers, self._layout.num_kv_heads), dtype=bool))
        with self._lock:
            if request_id in self._published:
                raise ValueError(f"request {request_id!r} is already published")
            self._released.pop(request_id, None)
            self._published[request_id] = published
            heapq.heappush(self._expiry, (published.deadline, next(self._seq), published))
        self._metrics.add("handles_published")
        self._metrics.add("pinned_requests")
        self._metrics.add("pinned_blocks", len(block_ids))
        return KVHandle(agent_name=self._config.name, agent_address=self._transport.address,
                        agent_process=self._pool.process, request_id=request_id, block_ids=block_ids,
                        num_tokens=num_tokens, layout=self._layout, secret=published.secret,
                        expires_at=time.time() + ttl, max_message_bytes=self._pool.max_message_bytes,
                        shared_pool=self._pool.shared)

    def end(self, request_id: str, reason: ReleaseReason) -> None:
        """Release a request (for `reason`) once no pull of it is in flight."""
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
            if time.monotonic() < published.deadline:  # until `expire` pops its deadline
                self._released[published.request_id] = published
        self._metrics.add(f"handles_{published.ending.value}")
        self._metrics.add("pinned_requests", -1)
        self._metrics.add("pinned_blocks", -len(published.block_ids))
        if published.on_release is not None:
            try:
                published.on_release(published.request_id, published.ending)
            except Exception:
                self._metrics.add("release_callback_errors")
                log.exception("on_release callback for %r failed", published.request_id)

    def expire(self, now: float) -> None:
        expired = []
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                published = heapq.heappop(self._expiry)[2]
                if self._released.get(published.request_id) is published:
                    del self._released[published.request_id]
                expired.append(published)
        for published in expired:
            published.ending = published.ending or ReleaseReason.EXPIRED
            self._maybe_release(published)

    def receive_control(self, now: float) -> bool:
        """Answer the pull requests and take the PullDones and PullAbandoneds that arrived."""
        def on_control(message: ControlMessage) -> None:
            if isinstance(message, PullDone):
                self._on_pull_done(message, now)
            elif isinstance(message, PullAbandoned):
                self._on_pull_abandoned(message)
            else:
                self._on_pull_request(message, now)
        return self._transport.receive_control(on_control)

    def _on_pull_request(self, request: PullRequest, now: float) -> None:
        with self._lock:
            published = self._published.get(request.request_id) or self._released.get(request.request_id)
        if published is None or not hmac.compare_digest(published.secret, request.secret):
            self._metrics.add("pulls_refused")  # unanswered: see the module docstring
            return
        try:
            self._transport.check_address(request.reply_address)
        except MalformedMessageError as e:
            self._metrics.add("malformed_messages")
            log.warning("dropped a pull request of %r: %s", request.request_id, e)
            return
        accepted = (published.ending is None and now < published.deadline
                    and self._config.allows(request.receiver_name) and not self._closing.is_set())
        block_bytes = 0
        if accepted:
            block_bytes = self._check_plan(published, request)
            if not block_bytes:
                self._metrics.add("malformed_messages")
                accepted = False
        if not accepted:
            self._metrics.add("pulls_refused")  # counted before the answer can reach anyone
        status = PullStatus.ACCEPTED if accepted else PullStatus.REFUSED
        answered = self._transport.send_control(
            request.reply_address, PullResponse(request.pull_id, status).to_bytes(),
            response_tag(request.pull_id), now + self._config.response_timeout_s)
        if accepted and not answered:
            self._metrics.add("serves_failed")
        if not (accepted and answered):
            return
        published.serving += 1
        serve = _Serve(request, published, self._transport.endpoint(request.reply_address), block_bytes,
                       accepted_at=now, started_at=now)
        if request.shared:
            self._readers[(request.reply_address, request.pull_id)] = serve
        else:
            self._serve_queue.append(serve)
        self._count_serves()

    def _check_plan(self, published: _Published, request: PullRequest) -> int:
        """Bytes per block of the requested selection, or 0 if the request is inconsistent."""
        (l0, l1), (h0, h1), b = request.layers, request.heads, request.boundaries
        layout = self._layout
        if not (0 <= l0 < l1 <= layout.num_layers and 0 <= h0 < h1 <= layout.num_kv_heads):
            return 0
        block_bytes = (l1 - l0) * 2 * layout.block_size * (h1 - h0) * layout.head_dim * layout.itemsize
        if request.shared:
            return block_bytes if self._pool.shared is not None and not b else 0
        if len(b) < 2 or b[0] != 0 or b[-1] != len(published.block_ids) or len(b) - 1 > MAX_MESSAGES:
            return 0
        sizes = np.diff(np.asarray(b, dtype=np.int64))
        if (sizes <= 0).any() or sizes.max() * block_bytes > self._pool.max_message_bytes:
            return 0
        return block_bytes

    def _on_pull_abandoned(self, abandoned: PullAbandoned) -> None:
        """A receiver this agent serves, holding the handle (it knows the secret), will not pull:
        release now. A serve of its own pull may still run: its request reached a sender that was
        frozen, and came in just before this message. That receiver will never read it nor take its
        messages, so the serve is failed rather than left to its transfer timeout."""
        with self._lock:
            published = self._published.get(abandoned.request_id)
        if (published is None or not self._config.allows(abandoned.receiver_name)
                or not hmac.compare_digest(published.secret, abandoned.secret)):
            return
        self.end(abandoned.request_id, ReleaseReason.ABANDONED)
        for serve in [*self._serve_queue, *self._serving, *self._readers.values()]:
            if serve.published is published and serve.request.receiver_name == abandoned.receiver_name:
                self._fail_serve(serve, "its receiver gave up on it")

    def _on_pull_done(self, done: PullDone, now: float) -> None:
        serve = self._readers.get((done.reply_address, done.pull_id))
        if serve is None or not hmac.compare_digest(serve.published.secret, done.secret):
            return  # late (the serve already timed out) or not from the reader
        serve.bytes_sent = len(serve.published.block_ids) * serve.block_bytes
        self._complete_serve(serve, now)

    def advance(self, now: float) -> bool:
        """Start queued serves as send slots free up, time out waiting ones, and send."""
        worked = False
        while self._serve_queue and len(self._serving) < self._config.max_concurrent_sends:
            serve = self._serve_queue.popleft()
            serve.started_at = serve.progress_at = now
            self._serving.append(serve)
            self._metrics.raise_to("most_sends_in_flight", len(self._serving))
            worked = True
        for serve in [*self._serve_queue, *self._readers.values()]:
            if now - serve.accepted_at > self._config.transfer_timeout_s:
                self._fail_serve(serve, f"not done within {self._config.transfer_timeout_s:g} s")
        for serve in list(self._serving):
            worked |= self._pump_serve(serve, now)
        self._count_serves()
        return worked

    def _count_serves(self) -> None:
        self._metrics.set("serves_queued", len(self._serve_queue))
        self._metrics.set("serves_in_flight", len(self._serving) + len(self._readers))

    def _pump_serve(self, serve: _Serve, now: float) -> bool:
        worked = False
        send_arena = self._staging.send
        for message in [m for m in serve.in_flight if m.request.completed]:
            serve.in_flight.remove(message)
            if message.staged_at is not None:
                self._staging.free(send_arena, message.staged_at, message.nbytes)
            try:
                message.request.check_error()
            except ucx_api.UCXError as e:
                self._fail_serve(serve, f"send failed: {e}")
                return True
            serve.bytes_sent += message.nbytes
            serve.progress_at = now
            worked = True
        request, published, layout = serve.request, serve.published, self._layout
        bounds = request.boundaries
        while serve.next_message < len(bounds) - 1 and len(serve.in_flight) < MESSAGES_IN_FLIGHT:
            k = serve.next_message
            ids = published.block_ids[bounds[k]:bounds[k + 1]]
            nbytes = len(ids) * serve.block_bytes
            view, staged_at = None, None
            if self._config.zero_copy and self._pool.on_host:
                view = source_bytes(self._pool.host_bytes, layout, ids, request.layers, request.heads)
            if view is None:
                staged_at = self._staging.alloc(send_arena, nbytes)
                if staged_at is None:
                    break
                shape = (len(ids), request.layers[1] - request.layers[0], 2, layout.block_size,
                         request.heads[1] - request.heads[0], layout.head_dim)
                out = send_arena.tensor(staged_at, nbytes).view(layout.torch_dtype).view(shape)
                gather(self._pool.tensor, ids, request.layers, request.heads, out)
                view = send_arena.array(staged_at, nbytes)
                self._metrics.add("bytes_staged_sent", nbytes)
            try:
                send = serve.endpoint.tag_send(Array(view), ucx_api.UCXXTag(data_tag(request.pull_id, k)))
            except ucx_api.UCXError as e:
                if staged_at is not None:
                    self._staging.free(send_arena, staged_at, nbytes)
                self._fail_serve(serve, f"send failed: {e}")
                return True
            serve.in_flight.append(Message(send, view, nbytes, staged_at=staged_at))
            serve.next_message += 1
            worked = True
        if serve.next_message == len(bounds) - 1 and not serve.in_flight:
            self._complete_serve(serve, now)
            return True
        if now - serve.progress_at > self._config.transfer_timeout_s:
            self._fail_serve(serve, f"no progress for {self._config.transfer_timeout_s:g} s")
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
        self._metrics.add("pulls_served")
        self._metrics.add("bytes_sent", serve.bytes_sent)
        self._metrics.observe("serve_duration_s", now - serve.started_at)
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
                self._staging.free(self._staging.send, message.staged_at, message.nbytes)
            else:
                self._transport.abandon(message, self._staging.send)
        serve.in_flight.clear()
        if peer_dead:
            self._transport.drop_endpoint(serve.request.reply_address)
        self._metrics.add("serves_failed")
        self._maybe_release(serve.published)

    def check_liveness(self) -> None:
        for serve in [*self._serve_queue, *self._serving, *self._readers.values()]:
            if serve.request.receiver.is_alive() is False:
                self._fail_serve(serve, "receiver process is gone", peer_dead=True)

    def fail_serves(self, reason: str) -> None:
        for serve in [*self._serve_queue, *self._serving, *self._readers.values()]:
            self._fail_serve(serve, reason)

    def release_all(self) -> None:
        """Release every published request (reason "revoked"), pulls in flight or not: the agent is closing."""
        with self._lock:
            remaining = list(self._published.values())
        for published in remaining:
            published.serving = 0
            self.end(published.request_id, ReleaseReason.REVOKED)
