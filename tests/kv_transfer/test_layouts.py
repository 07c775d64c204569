"""Layout conversion between two processes, each result checked against a plain-torch reference.

Senders (one agent per context rank) live in a child process, receivers (one per generation
rank) here. The reference takes each sender's blocks, lays them out token by token and casts them
(`expected_for`); the receiver's tokens must equal it exactly. Every case runs twice: reading the
sender's shared pool (converting while copying), and through UCX (gather, staging, conversion).
"""

import dataclasses

import pytest
import torch

from kv_transfer import KVHandle, KVLayout, TransferAgent, TransferConfig, allocate_kv_pool
from tests.helpers import wait_until
from tests.kv_transfer.peer import expected_for, token_view

MODEL = KVLayout(num_layers=4, num_kv_heads=4, head_dim=16, block_size=16)
TOKENS = 75  # not a multiple of any block size used: every case has a partial last block


@pytest.fixture(params=[True, False], ids=["shared-memory", "ucx"])
def shared(request):
    return request.param


def with_(layout: KVLayout, **changes) -> KVLayout:
    return dataclasses.replace(layout, **changes)


def run_case(peer, name, senders: list[KVLayout], receivers: list[KVLayout], shared: bool, receiver_config=None):
    """Publish TOKENS tokens from every sender, pull into every receiver, compare with the reference."""
    receiver_config = {"use_shared_memory": shared, **(receiver_config or {})}
    keys = [f"{name}-{shared}-ctx{i}" for i in range(len(senders))]
    sent_tokens, handles = [], []
    try:
        for i, (key, layout) in enumerate(zip(keys, senders)):
            peer.call("create_agent", key, layout.to_dict(), 32, 100 + i, {"name": key})
            blocks = list(range(31, 31 - layout.blocks_for(TOKENS), -1))  # descending: no runs
            handles.append(KVHandle.from_bytes(peer.call("publish", key, "req", blocks, TOKENS)))
            sent_tokens.append((layout, token_view(peer.call("blocks", key, blocks), layout,
                                                   range(len(blocks)), TOKENS)))
        received = []
        for j, layout in enumerate(receivers):
            pool = allocate_kv_pool(layout, 40)
            dest = [2 * k + 1 for k in range(layout.blocks_for(TOKENS))]
            with TransferAgent(pool, layout, TransferConfig(name=f"gen{j}", **receiver_config)) as agent:
                result = agent.pull(handles, dest).result(20)
                want = expected_for(layout, sent_tokens)
                assert not torch.isnan(want).any(), "the senders do not cover this receiver"
                assert torch.equal(token_view(pool, layout, dest, TOKENS), want)
                metrics = agent.metrics.snapshot()
                assert metrics["pulls_in_flight"] == 0 and metrics["staging_bytes_in_use"] == 0
                assert metrics["bytes_read_shared"] == (result.bytes_received if shared else 0)
                received.append(result.bytes_received)
        for key in keys:  # every sender released its request once, after all receivers pulled
            assert wait_until(lambda key=key: peer.call("releases_of", key), 5) == [("req", "pulled")]
        return received
    finally:
        for key in keys:
            peer.call("close_agent", key)


@pytest.mark.parametrize("sender,receiver", [
    (MODEL, with_(MODEL, block_size=8)),
    (with_(MODEL, block_size=8), with_(MODEL, block_size=32)),
    (with_(MODEL, block_size=6), with_(MODEL, block_size=4)),
], ids=["bs16-to-8", "bs8-to-32", "bs6-to-4"])
def test_block_size(peer, sender, receiver, shared, request):
    run_case(peer, request.node.callspec.id, [sender], [receiver], shared)


@pytest.mark.parametrize("sender,receiver", [
    (MODEL, with_(MODEL, dtype="bfloat16")),
    (with_(MODEL, dtype="bfloat16"), with_(MODEL, dtype="float16")),
    (with_(MODEL, dtype="float16"), with_(MODEL, dtype="float32", block_size=8)),
], ids=["fp32-to-bf16", "bf16-to-fp16", "fp16-to-fp32-bs8"])
def test_dtype(peer, sender, receiver, shared, request):
    run_case(peer, request.node.callspec.id, [sender], [receiver], shared)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_tp2_to_tp1_receives_from_both_ranks(peer, parallel, shared):
    senders = [MODEL.shard(tp_size=2, tp_rank=r) for r in range(2)]
    run_case(peer, f"tp2to1-{parallel}", senders, [MODEL], shared, {"parallel_receive": parallel})


def test_tp1_to_tp2_each_rank_gets_exactly_its_heads(peer, shared):
    receivers = [MODEL.shard(tp_size=2, tp_rank=r) for r in range(2)]
    sizes = run_case(peer, "tp1to2", [MODEL], receivers, shared)
    assert sizes == [MODEL.blocks_for(TOKENS) * MODEL.bytes_per_block // 2] * 2  # only its heads moved


def test_tp1_to_tp2_sender_holds_blocks_until_both_ranks_pulled(peer, shared):
    peer.call("create_agent", "hold", MODEL.to_dict(), 32, 5, {"name": "hold"})
    try:
        handle = KVHandle.from_bytes(peer.call("publish", "hold", "req", [1, 2, 3, 4, 5], TOKENS))
        for rank in range(2):
            layout = MODEL.shard(tp_size=2, tp_rank=rank)
            config = TransferConfig(name=f"gen{rank}", use_shared_memory=shared)
            with TransferAgent(allocate_kv_pool(layout, 8), layout, config) as agent:
                agent.pull(handle, [0, 1, 2, 3, 4]).result(10)
            if rank == 0:
                assert peer.call("releases_of", "hold") == []
                assert peer.call("metrics", "hold")["pinned_requests"] == 1
        assert wait_until(lambda: peer.call("releases_of", "hold"), 5) == [("req", "pulled")]
    finally:
        peer.call("close_agent", "hold")


def test_pp2_to_pp1_joins_layer_ranges(peer, shared):
    senders = [MODEL.shard(layers=(0, 1)), MODEL.shard(layers=(1, 4))]
    run_case(peer, "pp2to1", senders, [MODEL], shared)


def test_pp1_to_pp2_splits_layer_ranges(peer, shared):
    run_case(peer, "pp1to2", [MODEL], [MODEL.shard(layers=(0, 3)), MODEL.shard(layers=(3, 4))], shared)


def test_everything_at_once(peer, shared):
    """TP2 fp32 with 16-token blocks, split over two pipeline stages, into TP1 bf16 8-token blocks
    and a layer split of its own: every receiver pulls from the senders that hold its layers."""
    senders = [with_(MODEL.shard(tp_size=2, tp_rank=r, layers=layers))
               for layers in [(0, 2), (2, 4)] for r in range(2)]
    receivers = [with_(MODEL.shard(layers=layers), block_size=8, dtype="bfloat16") for layers in [(0, 1), (1, 4)]]
    run_case(peer, "mixed", senders, receivers, shared, {"max_tokens_in_buffer": 64})
