"""kv_transfer failures are errors within a bounded time, never hangs, and nothing leaks.

Peers are real processes: agents that get SIGKILLed mid-transfer, and a raw-ucxx peer that breaks
the protocol on purpose (tests.kv_transfer.peer.RogueSender).
"""

import os
import signal
import time

import pytest
import torch

from kv_transfer import (
    KVHandle,
    KVLayout,
    MalformedMessageError,
    PeerLostError,
    PeerUnreachableError,
    TransferAgent,
    TransferConfig,
    TransferTimeoutError,
    allocate_kv_pool,
)
from tests.helpers import wait_until
from tests.kv_transfer.peer import GARBAGE_MESSAGES, Peer, RogueSender

SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)
# 1 MiB fp32 blocks, received as bf16 one block per message (or per shared-memory read step),
# each converted: slow enough to be killed in the middle
BIG = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16)
BIG_BLOCKS = 160
SLOW_RECEIVER = dict(layout=KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16"),
                     config={"max_tokens_in_buffer": 128})


def agent_for(layout, num_blocks=8, **config):
    return TransferAgent(allocate_kv_pool(layout, num_blocks), layout, TransferConfig(**config))


def assert_clean(agent):
    metrics = agent.metrics.snapshot()
    assert metrics["pulls_in_flight"] == 0 and metrics["serves_in_flight"] == 0
    assert metrics["staging_bytes_in_use"] == 0


def test_sender_killed_mid_transfer_through_ucx_raises_peer_lost():
    with Peer() as peer:
        peer.call("create_agent", "ctx", BIG.to_dict(), BIG_BLOCKS, 1, {"name": "ctx"})
        handle = KVHandle.from_bytes(peer.call("publish", "ctx", "req", list(range(BIG_BLOCKS)), BIG_BLOCKS * 16))
        with agent_for(SLOW_RECEIVER["layout"], BIG_BLOCKS, name="gen", use_shared_memory=False,
                       **SLOW_RECEIVER["config"]) as agent:
            future = agent.pull(handle, list(range(BIG_BLOCKS)))
            wait_until(lambda: agent.metrics.snapshot()["bytes_received"] > 0, 10)
            assert not future.done()
            peer.kill()
            killed = time.monotonic()
            with pytest.raises(PeerLostError):
                future.result(timeout=5)
            assert time.monotonic() - killed < 2.0
            assert agent.metrics.snapshot()["pulls_failed"] == 1
            assert_clean(agent)


def test_sender_killed_during_a_read_of_its_shared_pool_cannot_hurt_the_reader():
    """The mapping outlives the sender: an accepted read completes with the pinned data."""
    with Peer() as peer:
        peer.call("create_agent", "ctx", BIG.to_dict(), BIG_BLOCKS, 1, {"name": "ctx"})
        handle = KVHandle.from_bytes(peer.call("publish", "ctx", "req", list(range(BIG_BLOCKS)), BIG_BLOCKS * 16))
        samples = [0, BIG_BLOCKS // 2, BIG_BLOCKS - 1]
        sent = peer.call("blocks", "ctx", samples)
        receiver = SLOW_RECEIVER["layout"]
        with agent_for(receiver, BIG_BLOCKS, name="gen", **SLOW_RECEIVER["config"]) as agent:
            future = agent.pull(handle, list(range(BIG_BLOCKS)))
            # Kill once the receiver has the sender's acceptance: from then on the read completes
            # from the mapping whatever happens to the sender. (Killed before it, the pull fails
            # with PeerUnreachableError: nothing says the blocks were pinned.) White-box, as nothing
            # public shows the acceptance.
            sub = wait_until(lambda: agent._pulls and agent._pulls[0].subs[0], 10, interval_s=0.001)  # a read is ~30 ms
            wait_until(lambda: sub.phase.name in ("RECEIVING", "DONE"), 10)
            peer.kill()
            assert future.result(timeout=10).bytes_received == BIG_BLOCKS * BIG.bytes_per_block
            assert torch.equal(agent._pool[samples], sent.to(receiver.torch_dtype))
            assert_clean(agent)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "ucx"])
def test_receiver_killed_mid_transfer_frees_the_sender(shared):
    released = []
    with agent_for(BIG, BIG_BLOCKS, name="ctx", zero_copy=False, handle_ttl_s=1.5) as sender:
        with Peer() as peer:
            peer.call("create_agent", "gen", SLOW_RECEIVER["layout"].to_dict(), BIG_BLOCKS, None,
                      {"name": "gen", "use_shared_memory": shared, **SLOW_RECEIVER["config"]})
            if shared:
                peer.call("hold_reads", "gen")  # the receiver dies mid-read, whatever the timing
            handle = sender.publish("req", list(range(BIG_BLOCKS)), BIG_BLOCKS * 16,
                                    on_release=lambda rid, why: released.append((rid, why.value)))
            peer.call("pull_start", "gen", [handle.to_bytes()], list(range(BIG_BLOCKS)))
            wait_until(lambda: sender.metrics.snapshot()["serves_in_flight"] == 1, 30)
            if not shared:  # through UCX: wait until data flows
                wait_until(lambda: sender.metrics.snapshot()["bytes_staged_sent"] > 0, 30)
            assert sender.metrics.snapshot()["pulls_served"] == 0
            peer.kill()
            killed = time.monotonic()
            wait_until(lambda: sender.metrics.snapshot()["serves_failed"] == 1, 3)
            assert time.monotonic() - killed < 2.0
        assert_clean(sender)
        # still healthy: serves another receiver, then lets the orphaned request expire
        other = sender.publish("req-2", [0, 1], 20)
        with agent_for(BIG, 4, name="gen-2") as receiver:
            receiver.pull(other, [2, 3]).result(10)
        assert wait_until(lambda: released, 5) == [("req", "expired")]
        assert sender.metrics.snapshot()["pinned_requests"] == 0


# the same-host read is fast: overdue while it copies; through UCX, while messages arrive
@pytest.mark.parametrize("shared,timeout_s", [(True, 0.02), (False, 0.05)], ids=["shared-memory", "ucx"])
def test_an_overdue_pull_ends_only_once_nothing_writes_its_blocks(shared, timeout_s):
    """The whole pull is bounded by the agent, and its future is done only when its destination is
    no longer written: the engine recomputes into those blocks, or hands them on, right after."""
    with Peer() as peer:
        peer.call("create_agent", "ctx", BIG.to_dict(), BIG_BLOCKS, 1, {"name": "ctx"})
        handle = KVHandle.from_bytes(peer.call("publish", "ctx", "req", list(range(BIG_BLOCKS)), BIG_BLOCKS * 16))
        with agent_for(SLOW_RECEIVER["layout"], BIG_BLOCKS, name="gen", use_shared_memory=shared,
                       **SLOW_RECEIVER["config"]) as agent:
            started = time.monotonic()
            future = agent.pull(handle, list(range(BIG_BLOCKS)), timeout_s=timeout_s)
            with pytest.raises(TransferTimeoutError, match="overdue"):
                future.result(timeout=10)
            assert time.monotonic() - started < 5.0
            assert_clean(agent)
            landed = agent._pool.clone()
            time.sleep(0.5)
            assert torch.equal(agent._pool, landed)
            assert agent.metrics.snapshot()["pulls_failed"] == 1


@pytest.mark.parametrize("shared", [False, True])
def test_a_pull_given_up_on_frees_the_senders_blocks_once_it_runs_again(shared):
    """The sender froze past the receiver's response timeout: the pull fails, the receiver (which
    prefills instead) says so, and the sender frees the blocks on resuming, not at the handle's
    expiry (30 s), which used to hold them while nobody would ever pull."""
    with Peer() as peer:
        peer.call("create_agent", "ctx", SMALL.to_dict(), 8, 1, {"name": "ctx"})
        handle = KVHandle.from_bytes(peer.call("publish", "ctx", "req", [0, 1], 16))
        with agent_for(SMALL, name="gen", use_shared_memory=shared, response_timeout_s=0.5) as agent:
            os.kill(peer.pid, signal.SIGSTOP)
            try:
                with pytest.raises(PeerUnreachableError):
                    agent.pull(handle, [0, 1]).result(timeout=5)
            finally:
                os.kill(peer.pid, signal.SIGCONT)
            wait_until(lambda: peer.call("releases_of", "ctx") == [("req", "abandoned")], 5)
            assert peer.call("metrics", "ctx")["pinned_blocks"] == 0
            assert_clean(agent)


def test_sender_gone_before_the_pull_is_unreachable():
    with Peer() as peer:
        peer.call("create_agent", "ctx", SMALL.to_dict(), 8, 1, {"name": "ctx"})
        handle = KVHandle.from_bytes(peer.call("publish", "ctx", "req", [0], 8))
    with agent_for(SMALL, name="gen") as agent:
        started = time.monotonic()
        with pytest.raises(PeerUnreachableError):
            agent.pull(handle, [0]).result(timeout=5)
        assert time.monotonic() - started < 1.0
        assert_clean(agent)


@pytest.fixture(scope="module")
def rogue():
    with RogueSender() as r:
        yield r


@pytest.fixture
def genuine_handle():
    """A real published handle, for the rogue peer to stand in for its sender."""
    with agent_for(SMALL, name="ctx") as sender:
        yield sender.publish("req", [1, 2], 16)


@pytest.mark.parametrize("mode,error,config,bound", [
    ("silent", PeerUnreachableError, {"response_timeout_s": 0.5}, 3.0),
    ("corrupt_response", MalformedMessageError, {}, 3.0),
    ("long_message", MalformedMessageError, {}, 3.0),
    ("stall", TransferTimeoutError, {"transfer_timeout_s": 0.5}, 3.0),
])
def test_misbehaving_sender_fails_the_pull_in_bounded_time(rogue, genuine_handle, mode, error, config, bound):
    rogue.set_mode(mode)
    with agent_for(SMALL, name="gen", **config) as agent:
        started = time.monotonic()
        with pytest.raises(error):
            agent.pull(rogue.handle_like(genuine_handle), [4, 5]).result(timeout=10)
        assert time.monotonic() - started < bound
        metrics = agent.metrics.snapshot()
        assert metrics["pulls_failed"] == 1
        assert metrics["malformed_messages"] == (1 if error is MalformedMessageError else 0)
        assert_clean(agent)


def test_garbage_control_messages_are_counted_and_ignored(rogue):
    with agent_for(SMALL, name="ctx") as sender:
        rogue.send_garbage_to(sender.address)
        wait_until(lambda: sender.metrics.snapshot()["malformed_messages"] == GARBAGE_MESSAGES, 5)
        handle = sender.publish("req", [3], 8)
        with agent_for(SMALL, name="gen") as receiver:
            receiver.pull(handle, [0]).result(10)
        wait_until(lambda: sender.metrics.snapshot()["pulls_served"] == 1, 5)
