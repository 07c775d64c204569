"""kv_transfer between two processes: pulls, concurrency, lifecycle, security.

The sender agents live in a child process (tests.kv_transfer.peer.Peer); receivers live here.
Pulls read the sender's shared pool unless the receiver says `use_shared_memory=False`; then the
data goes through UCX as it would between hosts.
"""

import dataclasses
import threading
import time

import pytest
import torch

from kv_transfer import (
    HandleExpiredError,
    KVHandle,
    KVLayout,
    PeerNotAllowedError,
    PeerUnreachableError,
    PullRefusedError,
    TransferAgent,
    TransferConfig,
    allocate_kv_pool,
)
from kv_transfer.layout import SharedPool
from tests.helpers import wait_until
from tests.kv_transfer.peer import token_view

LAYOUT = KVLayout(num_layers=4, num_kv_heads=4, head_dim=32, block_size=16)
SENDER_BLOCKS = 64


@pytest.fixture
def sender(peer, request):
    """A fresh sender agent in the peer process; checks on the way out that it holds nothing."""
    key = request.node.name
    config = getattr(request, "param", {})
    peer.call("create_agent", key, LAYOUT.to_dict(), SENDER_BLOCKS, 7, {"name": "ctx", **config})
    yield key
    wait_until(lambda: (m := peer.call("metrics", key))["pinned_requests"] == 0 and not m["serves_in_flight"], 5)
    metrics = peer.call("metrics", key)
    assert metrics["pinned_blocks"] == 0 and metrics["staging_bytes_in_use"] == 0 and not metrics["serves_queued"]
    peer.call("close_agent", key)


def receiver(name="gen", layout=LAYOUT, num_blocks=SENDER_BLOCKS, **config):
    pool = allocate_kv_pool(layout, num_blocks)
    return pool, TransferAgent(pool, layout, TransferConfig(name=name, **config))


def assert_receiver_clean(agent):
    metrics = agent.metrics.snapshot()
    assert metrics["pulls_in_flight"] == 0 and metrics["staging_bytes_in_use"] == 0


def publish(peer, key, request_id, blocks, tokens):
    return KVHandle.from_bytes(peer.call("publish", key, request_id, blocks, tokens))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "ucx"])
def test_pull_moves_blocks_without_staging_and_releases_them(peer, sender, shared):
    src_blocks = [5, 6, 7, 20, 21, 40]  # two runs and a lone block
    handle = publish(peer, sender, "req-1", src_blocks, 90)
    pool, agent = receiver(use_shared_memory=shared)
    with agent:
        dest = [3, 4, 10, 11, 12, 30]
        result = agent.pull(handle, dest).result(10)
        assert result.request_id == "req-1" and result.bytes_received == 6 * LAYOUT.bytes_per_block
        assert torch.equal(pool[dest], peer.call("blocks", sender, src_blocks))
        assert wait_until(lambda: peer.call("releases_of", sender), 5) == [("req-1", "pulled")]
        sent, received = peer.call("metrics", sender), agent.metrics.snapshot()
        assert sent["pulls_served"] == 1 and sent["bytes_sent"] == result.bytes_received
        assert sent["bytes_staged_sent"] == 0 and received["bytes_staged_received"] == 0  # zero-copy
        assert received["bytes_read_shared"] == (result.bytes_received if shared else 0)
        assert received["pulls_completed"] == 1 and received["pull_duration_s"]["count"] == 1
        assert_receiver_clean(agent)


def test_unmappable_shared_pool_falls_back_to_ucx(peer, sender):
    handle = publish(peer, sender, "req-fallback", [2, 3], 32)
    handle = dataclasses.replace(handle, shared_pool=SharedPool(fd=987, offset=0, nbytes=1 << 20))
    pool, agent = receiver()
    with agent:
        agent.pull(handle, [0, 1]).result(10)
        assert torch.equal(pool[[0, 1]], peer.call("blocks", sender, [2, 3]))
        assert agent.metrics.snapshot()["bytes_read_shared"] == 0


@pytest.mark.parametrize("sender", [{"zero_copy": False}], indirect=True)
def test_staged_pull_matches_and_returns_its_staging(peer, sender):
    handle = publish(peer, sender, "req-staged", list(range(10, 20)), 150)
    pool, agent = receiver(zero_copy=False, max_tokens_in_buffer=64, use_shared_memory=False)  # 1-block messages
    with agent:
        agent.pull(handle, list(range(20, 30))).result(10)
        # staging places tokens: the unused tail of the last block is left alone
        sent = token_view(peer.call("blocks", sender, list(range(10, 20))), LAYOUT, range(10), 150)
        assert torch.equal(token_view(pool, LAYOUT, range(20, 30), 150), sent)
        assert agent.metrics.snapshot()["bytes_staged_received"] == 10 * LAYOUT.bytes_per_block
        assert peer.call("metrics", sender)["bytes_staged_sent"] == 10 * LAYOUT.bytes_per_block
        assert_receiver_clean(agent)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "ucx"])
def test_pull_returns_at_once_and_the_caller_keeps_working(peer, shared):
    big = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16)  # 1 MiB blocks
    peer.call("create_agent", "big", big.to_dict(), 192, 1, {"name": "ctx-big"})
    try:
        handle = publish(peer, "big", "req-big", list(range(192)), 192 * 16)
        pool, agent = receiver(layout=big, num_blocks=192, use_shared_memory=shared)
        with agent:
            future = agent.pull(handle, list(range(192)))
            returned_before_done = not future.done()  # 192 MiB take tens of ms: a pull that waited is done
            steps = 0
            while not future.done():  # an engine loop: decode steps between polls
                torch.mm(torch.ones(64, 64), torch.ones(64, 64))
                time.sleep(0.001)
                steps += 1
            assert future.result().bytes_received == 192 << 20
            assert returned_before_done and steps >= 1, steps
    finally:
        peer.call("close_agent", "big")


@pytest.mark.parametrize("sender", [{"max_concurrent_sends": 2}], indirect=True)
def test_many_concurrent_pulls_respect_the_send_limit(peer, sender):
    requests = {f"req-{i}": [i * 8 + j for j in range(0, 8, 2)] for i in range(8)}  # scattered blocks
    handles = {rid: publish(peer, sender, rid, blocks, 60) for rid, blocks in requests.items()}
    pool, agent = receiver(num_blocks=64, use_shared_memory=False)  # the send limit is for UCX sends
    with agent:
        futures = {rid: agent.pull(h, [int(rid[4:]) * 4 + j for j in range(4)]) for rid, h in handles.items()}
        for future in futures.values():
            future.result(30)
        assert peer.call("metrics", sender)["most_sends_in_flight"] == 2
        for rid, future in futures.items():
            i = int(rid[4:])
            future.result()
            assert torch.equal(pool[i * 4:i * 4 + 4], peer.call("blocks", sender, requests[rid]))
        assert sorted(peer.call("releases_of", sender)) == sorted((rid, "pulled") for rid in requests)
        assert_receiver_clean(agent)


def test_agent_driven_from_non_main_threads(peer, sender):
    handle = publish(peer, sender, "req-thread", [1, 2], 20)
    outcome = {}

    def generation_loop():  # like an engine thread inside a Triton stub: creates, pulls, closes
        pool, agent = receiver()
        with agent:
            future = agent.pull(handle, [8, 9])
            while not future.done():
                time.sleep(0.001)
            outcome["ok"] = future.exception() is None and torch.equal(pool[[8, 9]], peer.call("blocks", sender, [1, 2]))

    thread = threading.Thread(target=generation_loop)
    thread.start()
    thread.join(20)
    assert outcome == {"ok": True}


def test_revoked_request_is_released_and_refused(peer, sender):
    handle = publish(peer, sender, "req-revoked", [3], 5)
    peer.call("revoke", sender, "req-revoked")
    assert wait_until(lambda: peer.call("releases_of", sender), 5) == [("req-revoked", "revoked")]
    pool, agent = receiver()
    with agent:
        with pytest.raises(PullRefusedError):
            agent.pull(handle, [0]).result(10)
        assert peer.call("metrics", sender)["pulls_refused"] == 1
        assert_receiver_clean(agent)


@pytest.mark.parametrize("sender", [{"handle_ttl_s": 0.3}], indirect=True)
def test_unpulled_request_expires(peer, sender):
    handle = publish(peer, sender, "req-ttl", [4, 5], 20)
    assert wait_until(lambda: peer.call("releases_of", sender), 3) == [("req-ttl", "expired")]
    metrics = peer.call("metrics", sender)
    assert metrics["handles_expired"] == 1 and metrics["pinned_requests"] == 0
    pool, agent = receiver(response_timeout_s=0.3)
    with agent:
        with pytest.raises(HandleExpiredError):  # caught here, before contacting the sender
            agent.pull(handle, [0, 1]).result(10)
        # a forged expiry does not help: the sender has forgotten the request and does not answer
        with pytest.raises(PeerUnreachableError):
            agent.pull(dataclasses.replace(handle, expires_at=time.time() + 60), [0, 1]).result(10)
        assert peer.call("metrics", sender)["pulls_refused"] == 1


def test_wrong_secret_is_unanswered_counted_and_reveals_nothing(peer, sender):
    """Only the holder of a handle gets an answer: anyone else could name any reply address."""
    handle = publish(peer, sender, "req-secret", [6, 7], 30)
    pool, agent = receiver(response_timeout_s=0.3)
    with agent:
        with pytest.raises(PeerUnreachableError) as wrong_secret:
            agent.pull(dataclasses.replace(handle, secret=bytes(16)), [0, 1]).result(10)
        with pytest.raises(PeerUnreachableError) as unknown_request:
            agent.pull(dataclasses.replace(handle, request_id="req-nobody"), [0, 1]).result(10)
        # the same silence for both: a prober cannot tell which request ids exist
        assert str(wrong_secret.value).replace("req-secret", "X") == str(unknown_request.value).replace("req-nobody", "X")
        assert peer.call("metrics", sender)["pulls_refused"] == 2
        assert not peer.call("releases_of", sender) and not pool.any()
        agent.pull(handle, [0, 1]).result(10)  # the rightful holder still gets it
        assert torch.equal(pool[[0, 1]], peer.call("blocks", sender, [6, 7]))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "ucx"])
def test_a_used_handle_cannot_be_pulled_again(peer, sender, shared):
    handle = publish(peer, sender, "req-once", [8, 9], 20)
    pool, agent = receiver(use_shared_memory=shared)
    with agent:
        agent.pull(handle, [0, 1]).result(10)
        assert wait_until(lambda: peer.call("releases_of", sender), 5) == [("req-once", "pulled")]
        with pytest.raises(PullRefusedError):  # the secret was for one pull: replaying it gets nothing
            agent.pull(handle, [2, 3]).result(10)
        assert peer.call("metrics", sender)["pulls_refused"] == 1
        assert not pool[[2, 3]].any()  # not even what a same-host read ahead of the answer copied
        assert_receiver_clean(agent)


@pytest.mark.parametrize("sender", [{"allowed_peers": ["gen-trusted"]}], indirect=True)
def test_allow_lists_on_both_sides(peer, sender):
    handle = publish(peer, sender, "req-allow", [9], 10)
    _, picky = receiver(name="gen-picky", allowed_peers={"ctx-elsewhere"})
    with picky:
        with pytest.raises(PeerNotAllowedError):  # refused locally: the sender is never contacted
            picky.pull(handle, [0]).result(10)
    assert peer.call("metrics", sender)["pulls_refused"] == 0
    _, stranger = receiver(name="gen-stranger")
    with stranger:
        with pytest.raises(PullRefusedError):
            stranger.pull(handle, [0]).result(10)
    assert peer.call("metrics", sender)["pulls_refused"] == 1
    pool, trusted = receiver(name="gen-trusted", allowed_peers={"ctx"})
    with trusted:
        trusted.pull(handle, [0]).result(10)
        assert torch.equal(pool[[0]], peer.call("blocks", sender, [9]))
