"""The control port under attack: forged, replayed and garbage-carrying messages do nothing.

The agent under attack lives in a child process (tests.kv_transfer.peer.Peer), so that if UCX
aborted on something it was sent, the test would fail rather than take pytest down with it. The
forged messages are made here and delivered by a raw ucxx peer (RogueSender).
"""

import dataclasses
import random

import pytest
import torch

from kv_transfer import (
    KVHandle,
    KVLayout,
    MalformedMessageError,
    PeerUnreachableError,
    TransferAgent,
    TransferConfig,
    allocate_kv_pool,
)
from kv_transfer.errors import UnauthenticatedMessageError
from kv_transfer.metrics import TransferMetrics
from kv_transfer.staging import Staging
from kv_transfer.transport import Transport
from kv_transfer.wire import MAC_BYTES, PullDone, PullRequest, check_worker_address, seal, unseal
from tests.helpers import wait_until
from tests.kv_transfer.peer import RogueSender

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)
KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def agent(name, num_blocks=8, **config):
    return TransferAgent(allocate_kv_pool(LAYOUT, num_blocks), LAYOUT, TransferConfig(name=name, **config))


@pytest.fixture(scope="module")
def rogue():
    with RogueSender() as r:
        yield r


@pytest.fixture
def sender(peer, request):
    """A keyed sender agent in the peer process, with one request published."""
    key = request.node.name
    peer.call("create_agent", key, LAYOUT.to_dict(), 8, 3, {"name": "ctx", "deployment_key": KEY})
    yield key, KVHandle.from_bytes(peer.call("publish", key, "req", [1, 2], 16))
    peer.call("close_agent", key)


def test_seal_binds_the_frame_to_the_key_and_the_recipient():
    frame = PullDone(7, b"a" * 32, bytes(16)).to_bytes()
    sealed = seal(frame, KEY, b"agent-1")
    assert len(sealed) == len(frame) + MAC_BYTES and seal(frame, None, b"agent-1") == frame
    assert bytes(unseal(sealed + bytes(100), KEY, b"agent-1")) == frame  # the rest of the buffer is ignored
    forgeries = [frame, seal(frame, OTHER_KEY, b"agent-1"), seal(frame, KEY, b"agent-2"), sealed[:-1],
                 sealed[:-1] + bytes([sealed[-1] ^ 1]), sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:], b""]
    for forged in forgeries:
        with pytest.raises(UnauthenticatedMessageError):
            unseal(forged, KEY, b"agent-1")
    assert bytes(unseal(frame, None, b"agent-1")) == frame  # no key: nothing to check


def test_worker_addresses_that_would_abort_ucx_are_rejected():
    with agent("gen") as receiver:
        own = receiver.address
        check_worker_address(own, own)
        for garbage in (b"", b"not an address", own[:8], own + bytes(4096),
                        bytes([own[0] ^ 0x04]) + own[1:]):  # another address version: UCX asserts on it
            with pytest.raises(MalformedMessageError):
                check_worker_address(garbage, own)


def test_deployment_key_accepts_text_hides_from_repr_and_must_be_long():
    config = TransferConfig(deployment_key="s" * 32)
    assert config.deployment_key == b"s" * 32 and "sss" not in repr(config)
    with pytest.raises(ValueError, match="deployment_key"):
        TransferConfig(deployment_key=b"short")
    with pytest.raises(ValueError, match="max_endpoints"):
        TransferConfig(max_endpoints=0)


def test_endpoint_cache_closes_the_least_recently_used_idle_endpoint():
    metrics = TransferMetrics()
    in_use: set[bytes] = set()
    config = TransferConfig(max_endpoints=2)
    transport = Transport(config, metrics, Staging(4096, pin_memory=False, metrics=metrics), lambda: in_use)
    closed = []
    drop_endpoint = transport.drop_endpoint
    transport.drop_endpoint = lambda address: (closed.append(address), drop_endpoint(address))
    peers = [agent(f"peer-{i}") for i in range(4)]
    try:
        a, b, c, d = (p.address for p in peers)
        first_a = transport.endpoint(a)
        transport.endpoint(b)
        in_use.add(a)  # a transfer uses a: b goes, though a is older
        transport.endpoint(c)
        assert closed == [b] and list(transport._endpoints) == [a, c]
        assert transport.endpoint(a) is first_a  # cached, and now the most recently used
        in_use.clear()
        transport.endpoint(d)
        assert closed == [b, c] and list(transport._endpoints) == [a, d]
        in_use.update((a, d))  # everything in use: the cache grows rather than break a transfer
        transport.endpoint(b)
        assert closed == [b, c] and transport.endpoint_count == 3
    finally:
        transport.close()
        for p in peers:
            p.close()


def forged_requests(handle: KVHandle, reply_address: bytes, recipient: bytes) -> dict[str, tuple[list[bytes], str]]:
    """Well-formed pull requests and pull dones that must do nothing, each with the counter it must move."""
    genuine = PullRequest(pull_id=1, reply_address=reply_address, receiver_name="gen",
                          receiver=handle.agent_process, request_id=handle.request_id, secret=handle.secret,
                          layers=(0, LAYOUT.num_layers), heads=(0, LAYOUT.num_kv_heads), shared=False,
                          boundaries=(0, len(handle.block_ids)))
    frame = genuine.to_bytes()
    sealed = seal(frame, KEY, recipient)

    def sealed_with(**changes) -> bytes:
        return seal(dataclasses.replace(genuine, **changes).to_bytes(), KEY, recipient)

    rng = random.Random(17)
    fuzzed = [seal(dataclasses.replace(genuine, pull_id=rng.randrange(1, 1 << 40), secret=rng.randbytes(16),
                                       request_id=rng.choice([handle.request_id, "req-x"]),
                                       reply_address=rng.randbytes(rng.randrange(200)),
                                       shared=rng.random() < 0.5).to_bytes(), OTHER_KEY, recipient)
              for _ in range(40)]
    return {
        # the deployment key is what lets a message in: the request's own secret does not
        "no MAC": ([frame], "unauthenticated_messages"),
        "another deployment's key": ([seal(frame, OTHER_KEY, recipient)], "unauthenticated_messages"),
        "replayed from another agent": ([seal(frame, KEY, reply_address)], "unauthenticated_messages"),
        "MAC altered": ([sealed[:-1] + bytes([sealed[-1] ^ 1])], "unauthenticated_messages"),
        "body altered": ([sealed_with(pull_id=2)[:len(frame)] + sealed[len(frame):]], "unauthenticated_messages"),
        "fuzzed": (fuzzed, "unauthenticated_messages"),
        # authentic, but without the request's secret: no answer, so no connection anywhere
        "wrong secret": ([sealed_with(secret=bytes(16))], "pulls_refused"),
        "unknown request": ([sealed_with(request_id="req-nobody")], "pulls_refused"),
        "garbage address, no secret": ([sealed_with(reply_address=b"\x0f" * 188, secret=bytes(16))], "pulls_refused"),
        # authentic and with the secret, but an address that would make UCX abort
        "garbage address": ([sealed_with(reply_address=b"\x0f" * 188)], "malformed_messages"),
        "text address": ([sealed_with(reply_address=b"not an address")], "malformed_messages"),
        # a reader's "done" that is not from the reader: nothing to release
        "done, unknown pull": ([seal(PullDone(1, reply_address, handle.secret).to_bytes(), KEY, recipient)], ""),
        "done, wrong secret": ([seal(PullDone(1, reply_address, bytes(16)).to_bytes(), KEY, recipient)], ""),
    }


def test_forged_control_messages_open_nothing_serve_nothing_and_are_counted(peer, rogue, sender):
    key, handle = sender
    before = peer.call("metrics", key)
    cases = forged_requests(handle, reply_address=rogue.address, recipient=handle.agent_address)
    expected = dict.fromkeys(("unauthenticated_messages", "pulls_refused", "malformed_messages"), 0)
    for payloads, counter in cases.values():
        rogue.send_control_to(handle.agent_address, payloads)
        if counter:
            expected[counter] += len(payloads)
    assert wait_until(lambda: all(peer.call("metrics", key)[c] == n for c, n in expected.items()), 10)
    metrics = peer.call("metrics", key)
    assert peer.call("endpoints", key) == 0  # never connected back to anyone
    assert metrics["pulls_served"] == metrics["serves_in_flight"] == metrics["serves_failed"] == 0
    assert metrics["pinned_requests"] == 1 and not peer.call("releases_of", key)
    assert metrics["bytes_sent"] == before["bytes_sent"] == 0
    # alive, and the rightful holder still gets the KV
    pool = allocate_kv_pool(LAYOUT, 8)
    with TransferAgent(pool, LAYOUT, TransferConfig(name="gen", deployment_key=KEY, use_shared_memory=False)) as gen:
        gen.pull(handle, [5, 6]).result(10)
        assert torch.equal(pool[[5, 6]], peer.call("blocks", key, [1, 2]))
    assert wait_until(lambda: peer.call("releases_of", key), 5) == [("req", "pulled")]
    assert peer.call("endpoints", key) == 1


@pytest.mark.parametrize("receiver_key", [None, OTHER_KEY], ids=["no-key", "other-key"])
def test_a_receiver_without_the_deployment_key_gets_no_answer(peer, sender, receiver_key):
    key, handle = sender
    with agent("gen", deployment_key=receiver_key, response_timeout_s=0.3) as gen:
        with pytest.raises(PeerUnreachableError):
            gen.pull(handle, [0, 1]).result(10)
    # Its pull request, then the PullAbandoned it sends on giving up: both dropped unread.
    assert wait_until(lambda: peer.call("metrics", key)["unauthenticated_messages"] == 2, 5)
    assert peer.call("endpoints", key) == 0 and peer.call("metrics", key)["pulls_refused"] == 0
    assert peer.call("metrics", key)["pinned_blocks"] == 2  # an unauthenticated abandon frees nothing


def test_a_forged_acceptance_is_dropped_and_starts_nothing(rogue, peer, sender):
    """The rogue answers the pull with an ACCEPTED it cannot sign: the receiver keeps waiting for an
    authentic answer, then gives up as for a sender that never answered."""
    _, handle = sender
    rogue.set_mode("stall")  # ACCEPTED, then no data
    with agent("gen", deployment_key=KEY, response_timeout_s=0.5) as gen:
        with pytest.raises(PeerUnreachableError):
            gen.pull(rogue.handle_like(handle), [0, 1]).result(10)
        metrics = gen.metrics.snapshot()
        assert metrics["unauthenticated_messages"] == 1 and metrics["bytes_received"] == 0
        assert metrics["pulls_failed"] == 1 and metrics["pulls_in_flight"] == 0
