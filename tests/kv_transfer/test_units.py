"""kv_transfer pieces that need no second process: layouts, encodings, planning, copies, staging."""

import concurrent.futures
import dataclasses
import fcntl
import os
import platform
import stat

import numpy as np
import pytest
import torch

from kv_transfer import (
    KVHandle,
    KVLayout,
    LayoutMismatchError,
    MalformedMessageError,
    TransferAgent,
    TransferConfig,
    allocate_kv_pool,
    conversion,
)
from kv_transfer.conversion import (
    PARALLEL_COPY_MIN_BYTES,
    Route,
    copy_bytes,
    copy_selection,
    gather,
    parallel_copy,
    scatter,
    source_bytes,
)
from kv_transfer.layout import map_shared_pool, shared_pool_of
from kv_transfer.liveness import ProcessIdentity
from kv_transfer.metrics import Histogram, TransferMetrics
from kv_transfer.staging import StagingArena
from kv_transfer.wire import PullDone, PullRequest, PullResponse, PullStatus, data_tag, decode_control, response_tag
from tests.kv_transfer.peer import expected_for, fill_pool, token_view

MODEL = KVLayout(num_layers=4, num_kv_heads=4, head_dim=8, block_size=4)


def make_handle(layout=MODEL, blocks=(3, 4, 9), tokens=10) -> KVHandle:
    return KVHandle(agent_name="ctx-0", agent_address=b"\x01" * 40, agent_process=ProcessIdentity.current(),
                    request_id="req-ä", block_ids=tuple(blocks), num_tokens=tokens, layout=layout,
                    secret=os.urandom(16), expires_at=1e10, max_message_bytes=1 << 20,
                    shared_pool=shared_pool_of(allocate_kv_pool(layout, 1)))


def test_layout_defaults_shard_and_validation():
    assert (MODEL.total_layers, MODEL.total_kv_heads) == (4, 4)
    assert MODEL.bytes_per_block == 4 * 2 * 4 * 4 * 8 * 4
    tp = MODEL.shard(tp_size=2, tp_rank=1, layers=(2, 4))
    assert (tp.head_start, tp.num_kv_heads, tp.layer_start, tp.num_layers) == (2, 2, 2, 2)
    assert KVLayout.from_dict(tp.to_dict()) == tp
    with pytest.raises(ValueError):
        MODEL.shard(tp_size=3)
    with pytest.raises(ValueError):
        KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="int8")
    with pytest.raises(ValueError):
        KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, layer_start=1, total_layers=2)


def test_allocated_pool_is_aligned_zeroed_shared_and_checked():
    pool = allocate_kv_pool(MODEL, 8)
    assert pool.data_ptr() % 4096 == 0 and pool.is_contiguous() and not pool.any()
    MODEL.check_pool(pool)
    shared = shared_pool_of(pool[2:4])
    assert shared.offset == 2 * MODEL.bytes_per_block and shared.nbytes == 2 * MODEL.bytes_per_block
    mapped = map_shared_pool(os.getpid(), shared_pool_of(pool)).view(torch.float32).view(pool.shape)
    pool[5] = 1.5
    assert torch.equal(mapped, pool)  # a second mapping of the same memory
    assert shared_pool_of(torch.zeros(4)) is None
    with pytest.raises(ValueError):
        MODEL.check_pool(pool[:, :2])
    with pytest.raises(ValueError):
        MODEL.check_pool(pool.to(torch.float16))


def test_shared_pool_is_private_to_its_user_and_keeps_its_size():
    """Opened as a peer would (through /proc), the pool's memfd is 0600 and refuses every resize:
    truncating it would kill each process that maps it with SIGBUS."""
    shared = shared_pool_of(pool := allocate_kv_pool(MODEL, 2))
    fd = os.open(f"/proc/{os.getpid()}/fd/{shared.fd}", os.O_RDWR)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        for size in (0, shared.nbytes - 4096, shared.nbytes + 4096):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):  # nor can the seals change
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(fd).st_size == shared.nbytes == pool.numel() * pool.element_size()
    finally:
        os.close(fd)


def test_handle_round_trips_through_bytes_and_uint8_tensor():
    handle = make_handle()
    data = handle.to_bytes()
    assert KVHandle.from_bytes(data) == handle
    as_tensor = np.frombuffer(data, dtype=np.uint8).copy()  # how Triton carries it
    assert KVHandle.from_bytes(as_tensor) == handle
    assert "secret" not in repr(handle) or handle.secret.hex() not in repr(handle)


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_damaged_handle_is_rejected(damage):
    data = bytearray(make_handle().to_bytes())
    if damage == "truncate":
        data = data[:-7]
    elif damage == "flip":
        data[40] ^= 0x10
    elif damage == "magic":
        data[0:4] = b"XXXX"
    else:
        data = b""
    with pytest.raises(MalformedMessageError):
        KVHandle.from_bytes(bytes(data))


def test_handle_with_inconsistent_block_count_is_rejected():
    bad = dataclasses.replace(make_handle(), block_ids=(1, 2))
    with pytest.raises(MalformedMessageError):
        KVHandle.from_bytes(bad.to_bytes())


def test_control_messages_round_trip_and_reject_damage():
    request = PullRequest(7, b"addr", "gen-0", ProcessIdentity.current(), "r", b"s" * 16, (0, 4), (1, 3),
                          shared=False, boundaries=(0, 2, 5))
    framed = request.to_bytes()
    assert decode_control(framed + bytes(100)) == request  # posted buffers have slack after the frame
    done = PullDone(7, b"addr", b"s" * 16)
    assert decode_control(done.to_bytes()) == done
    with pytest.raises(MalformedMessageError):
        PullRequest.from_bytes(framed[:-1])
    with pytest.raises(MalformedMessageError):
        PullResponse.from_bytes(framed)  # wrong kind of message
    response = PullResponse(7, PullStatus.REFUSED)
    assert PullResponse.from_bytes(response.to_bytes()) == response
    assert len({data_tag(7, 0), data_tag(7, 1), data_tag(8, 0), response_tag(7)}) == 4


def test_plan_cuts_at_source_runs_destination_runs_and_size():
    route = Route.between(MODEL, MODEL)
    block = route.block_bytes
    src = [0, 1, 2, 7, 8, 9]
    dst = [4, 5, 9, 10, 11, 12]
    assert route.plan(src, dst, 100 * block, in_place=True) == [0, 2, 3, 6]
    assert route.plan(src, dst, 100 * block, in_place=False) == [0, 3, 6]
    assert route.plan(src, dst, 2 * block, in_place=False) == [0, 2, 3, 5, 6]
    with pytest.raises(LayoutMismatchError):
        route.plan(src, dst, block - 1, in_place=False)


def test_plan_for_a_layer_slice_sends_block_by_block():
    receiver = MODEL.shard(layers=(1, 3))
    route = Route.between(MODEL, receiver)
    assert route.src_layers == (1, 3) and route.dst_layers == (0, 2)
    assert route.plan([0, 1, 2], [0, 1, 2], 1 << 30, in_place=True) == [0, 1, 2, 3]


def test_routes_between_shards():
    sender = MODEL.shard(tp_size=2, tp_rank=1)
    receiver = MODEL.shard(layers=(2, 4))
    route = Route.between(sender, receiver)
    assert (route.layers, route.heads, route.src_heads, route.dst_heads) == ((2, 4), (2, 4), (0, 2), (2, 4))
    assert not route.lands_in_place()
    assert Route.between(MODEL.shard(layers=(0, 2)), receiver) is None
    with pytest.raises(LayoutMismatchError):
        Route.between(MODEL, dataclasses.replace(MODEL, head_dim=16))


def test_source_bytes_only_for_contiguous_selections():
    pool = allocate_kv_pool(MODEL, 8)
    flat = pool.reshape(-1).view(torch.uint8).numpy()
    whole = source_bytes(flat, MODEL, [2, 3], (0, 4), (0, 4))
    assert whole.ctypes.data == pool[2].data_ptr() and whole.nbytes == 2 * MODEL.bytes_per_block
    layers = source_bytes(flat, MODEL, [5], (1, 3), (0, 4))
    assert layers.ctypes.data == pool[5, 1].data_ptr() and layers.nbytes == MODEL.bytes_per_block // 2
    assert source_bytes(flat, MODEL, [2, 4], (0, 4), (0, 4)) is None
    assert source_bytes(flat, MODEL, [2], (0, 4), (0, 2)) is None
    assert source_bytes(flat, MODEL, [2, 3], (1, 3), (0, 4)) is None


@pytest.mark.parametrize("sender,receiver", [
    (MODEL, dataclasses.replace(MODEL, block_size=3, dtype="bfloat16")),
    (MODEL.shard(tp_size=2, tp_rank=1), dataclasses.replace(MODEL, block_size=8, dtype="float16")),
    (dataclasses.replace(MODEL, block_size=5), MODEL.shard(layers=(1, 4))),
])
def test_gather_then_scatter_matches_plain_torch(sender, receiver):
    tokens = 13
    src_pool = allocate_kv_pool(sender, 8)
    fill_pool(src_pool, 3)
    dst_pool = allocate_kv_pool(receiver, 8)
    src_ids = [6, 1, 2, 7][:sender.blocks_for(tokens)]
    dst_ids = [5, 0, 3, 4, 7][:receiver.blocks_for(tokens)]
    route = Route.between(sender, receiver)
    selection = torch.empty((len(src_ids), *route.block_shape), dtype=sender.torch_dtype)
    gather(src_pool, src_ids, route.src_layers, route.src_heads, selection)
    scatter(route, selection, 0, dst_pool, dst_ids, tokens)
    want = expected_for(receiver, [(sender, token_view(src_pool, sender, src_ids, tokens))])
    got = token_view(dst_pool, receiver, dst_ids, tokens)
    l0, l1 = route.dst_layers
    h0, h1 = route.dst_heads
    assert torch.equal(got[l0:l1, :, :, h0:h1], want[l0:l1, :, :, h0:h1])


@pytest.mark.parametrize("sender,receiver", [
    (MODEL, MODEL),  # byte for byte: one memcpy per run
    (MODEL, dataclasses.replace(MODEL, block_size=8, dtype="bfloat16")),
    (MODEL, MODEL.shard(tp_size=2, tp_rank=0, layers=(1, 3))),
])
def test_copy_from_a_mapped_pool_matches_plain_torch(sender, receiver):
    tokens = 13
    src_pool = allocate_kv_pool(sender, 8)
    fill_pool(src_pool, 4)
    mapped = map_shared_pool(os.getpid(), shared_pool_of(src_pool)).view(torch.float32).view(src_pool.shape)
    dst_pool = allocate_kv_pool(receiver, 8)
    src_ids = [6, 7, 2, 3]
    dst_ids = [1, 2, 5, 6][:receiver.blocks_for(tokens)]
    route = Route.between(sender, receiver)
    copy_selection(route, mapped, src_ids, dst_pool, dst_ids, tokens)
    want = expected_for(receiver, [(sender, token_view(src_pool, sender, src_ids, tokens))])
    assert torch.equal(token_view(dst_pool, receiver, dst_ids, tokens), want)


def test_staging_arena_first_fit_and_merge():
    arena = StagingArena(5 * 4096, pin_memory=False)
    a = arena.alloc(4096)
    b = arena.alloc(5000)  # two pages
    c = arena.alloc(4096)
    assert (a, b, c) == (0, 4096, 3 * 4096) and arena.alloc(8192) is None
    arena.free(b, 5000)
    assert arena.alloc(8192) == 4096
    arena.free(a, 4096)
    arena.free(4096, 8192)
    arena.free(c, 4096)
    assert arena.in_use == 0 and arena.alloc(5 * 4096) == 0
    assert arena.tensor(0, 4096).data_ptr() % 4096 == 0
    with pytest.raises(ValueError):
        arena.alloc(6 * 4096)


def test_metrics_counters_and_histogram():
    metrics = TransferMetrics()
    metrics.add("bytes_sent", 10)
    metrics.observe("pull_duration_s", 0.003)
    metrics.observe("pull_duration_s", 100.0)
    snap = metrics.snapshot()
    assert snap["bytes_sent"] == 10 and snap["pulls_in_flight"] == 0
    buckets = snap["pull_duration_s"]["buckets"]
    assert buckets[0.0025] == 0 and buckets[0.005] == 1 and buckets[float("inf")] == 2
    assert Histogram().snapshot()["count"] == 0


def test_liveness_of_this_and_other_processes():
    me = ProcessIdentity.current()
    assert me.is_alive() is True
    assert dataclasses.replace(me, start_ticks=me.start_ticks + 1).is_alive() is False  # pid reused
    assert dataclasses.replace(me, pid=2 ** 22 + 1).is_alive() is False
    assert dataclasses.replace(me, boot_id="another-host").is_alive() is None


def test_agent_is_reachable_over_loopback_only_unless_configured():
    """UCX may use only the configured interface (UCX_NET_DEVICES): by default nothing off this host."""
    assert TransferConfig().bind_interface == "lo"
    with TransferAgent(allocate_kv_pool(MODEL, 2), MODEL, TransferConfig(name="a")) as agent:
        assert agent._context.config["NET_DEVICES"] == "lo"


@pytest.mark.parametrize("num_helpers", [0, 1, 3])
@pytest.mark.parametrize("nbytes", [1000, PARALLEL_COPY_MIN_BYTES, 3 * PARALLEL_COPY_MIN_BYTES + 4097])
def test_parallel_copy_copies_every_byte_once_whatever_the_split(nbytes, num_helpers):
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes + 16, dtype=np.uint8)
    with concurrent.futures.ThreadPoolExecutor(max(num_helpers, 1)) as helpers:
        parallel_copy(dst[8:-8], src, helpers, num_helpers)
    np.testing.assert_array_equal(dst[8:-8], src)
    assert not dst[:8].any() and not dst[-8:].any()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="non-temporal stores are built for x86-64 only")
def test_the_cache_bypassing_copy_is_built_on_x86_64():
    """`pip install -e .` compiles it; without it, large same-host reads are slower (README)."""
    from kv_transfer import _stream_copy
    assert _stream_copy.NON_TEMPORAL == 1


@pytest.mark.parametrize("bypass_caches", [False, True])
@pytest.mark.parametrize("offset,nbytes", [(0, 0), (3, 5), (1, 64), (7, 4096 + 63), (16, 1 << 20), (5, (1 << 20) + 17)])
def test_copy_bytes_copies_exactly_the_range_at_any_alignment(offset, nbytes, bypass_caches):
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes + 32, dtype=np.uint8)[offset:offset + nbytes]
    src.flags.writeable = False  # a mapped peer pool is read-only
    dst = np.zeros(nbytes + 64, dtype=np.uint8)
    copy_bytes(dst[9:9 + nbytes], src, bypass_caches)
    np.testing.assert_array_equal(dst[9:9 + nbytes], src)
    assert not dst[:9].any() and not dst[9 + nbytes:].any()


def test_copy_bytes_falls_back_to_numpy_without_the_extension(monkeypatch):
    monkeypatch.setattr(conversion, "_stream_copy", None)
    src = np.arange(5 << 20, dtype=np.uint8)[3:]
    dst = np.zeros_like(src)
    parallel_copy(dst, src, None, 0)
    np.testing.assert_array_equal(dst, src)


def test_the_cache_bypassing_copy_refuses_ranges_it_cannot_copy():
    if conversion._stream_copy is None:
        pytest.skip("the extension is not built")
    with pytest.raises(ValueError, match="copy of 10 bytes into 9 bytes"):
        conversion._stream_copy.copy(np.zeros(9, dtype=np.uint8), np.zeros(10, dtype=np.uint8))
    with pytest.raises(TypeError):  # strided: not one contiguous range
        conversion._stream_copy.copy(np.zeros(10, dtype=np.uint8)[::2], np.zeros(5, dtype=np.uint8))
