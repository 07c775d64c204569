"""The hash chain of a prompt's full KV blocks, shared by the engine's prefix cache and the
KV-cache-aware router: both must compute the same chain, and the router must not load the engine."""

from __future__ import annotations

import hashlib
from array import array

NO_HASH = -1


def block_hash(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Stable across processes, so a router can compute the same chain as the engine."""
    digest = hashlib.blake2b(
        parent_hash.to_bytes(8, "little", signed=True) + array("q", token_ids).tobytes(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little", signed=True) & 0x7FFF_FFFF_FFFF_FFFF


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The hash chain of every full block of `token_ids`."""
    hashes, parent = [], NO_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
