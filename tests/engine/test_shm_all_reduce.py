"""The shared-memory all-reduce between real processes: exact sums call after call, and a dead peer
is an error within a second, not a hang."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from python_backend_utils.engine import cpu_kernels
from python_backend_utils.engine.shm_all_reduce import (
    PeerLostError,
    SharedMemoryAllReduce,
    create_region,
    slot_bytes,
)

pytestmark = pytest.mark.skipif(not cpu_kernels.shared_memory_sync_applies(), reason="the C kernels are not built")

SIZE = 3
SLOT = slot_bytes(64, 96)
CALLS = 300
# Call i sums, on every rank, contribution(rank, i) for each rank: shapes from one row (decode) to a
# full slot, fp32 and bf16.
SHAPES = [(1, 96), (8, 96), (64, 96), (3, 7)]

PEER = """
import sys, torch
from python_backend_utils.engine.shm_all_reduce import SharedMemoryAllReduce
from tests.engine.test_shm_all_reduce import CALLS, SIZE, SLOT, contribution, expected_sum
rank, region = int(sys.argv[1]), int(sys.argv[2])
reduce = SharedMemoryAllReduce(region, rank, SIZE, SLOT, peers_alive=lambda: True, timeout_s=60)
for call in range(CALLS if len(sys.argv) < 4 else int(sys.argv[3])):
    assert torch.equal(reduce(contribution(rank, call)), expected_sum(call)), call
"""


def contribution(rank: int, call: int) -> torch.Tensor:
    shape = SHAPES[call % len(SHAPES)]
    dtype = torch.bfloat16 if call % 3 == 2 else torch.float32
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * call + rank)).to(dtype)


def expected_sum(call: int) -> torch.Tensor:
    """Every rank's contribution added in rank order: the bits each rank must get."""
    total = contribution(0, call)
    for rank in range(1, SIZE):
        total += contribution(rank, call)
    return total


def start_peers(region: int, calls: int | None = None) -> list[subprocess.Popen]:
    extra = [] if calls is None else [str(calls)]
    return [subprocess.Popen([sys.executable, "-c", PEER, str(rank), str(region), *extra], pass_fds=(region,))
            for rank in range(1, SIZE)]


def test_every_call_gives_every_rank_the_sum_in_rank_order():
    region = create_region(SIZE, SLOT)
    peers = start_peers(region)
    try:
        reduce = SharedMemoryAllReduce(region, 0, SIZE, SLOT, peers_alive=lambda: all(p.poll() is None for p in peers),
                                       timeout_s=60)
        for call in range(CALLS):
            assert torch.equal(reduce(contribution(0, call)), expected_sum(call)), call
        assert reduce.calls == CALLS
        assert [peer.wait(timeout=60) for peer in peers] == [0] * (SIZE - 1)  # each peer got the same bits
    finally:
        for peer in peers:
            peer.kill()


def test_a_peer_that_dies_is_an_error_at_once():
    region = create_region(SIZE, SLOT)
    peers = start_peers(region, calls=5)  # they stop taking part after five calls
    try:
        reduce = SharedMemoryAllReduce(region, 0, SIZE, SLOT, peers_alive=lambda: all(p.poll() is None for p in peers),
                                       timeout_s=60)
        for call in range(5):
            reduce(contribution(0, call))
        started = time.monotonic()
        with pytest.raises(PeerLostError, match="exited"):
            reduce(contribution(0, 5))
        assert time.monotonic() - started < 5
    finally:
        for peer in peers:
            peer.kill()


def test_tensors_larger_than_a_slot_are_left_to_the_process_group():
    region = create_region(SIZE, SLOT)
    reduce = SharedMemoryAllReduce(region, 0, SIZE, SLOT, peers_alive=lambda: True, timeout_s=1)
    assert reduce.fits(torch.zeros(64, 96)) and not reduce.fits(torch.zeros(65, 96))
