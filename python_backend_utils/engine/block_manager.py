"""Fixed-size KV blocks: free list, reference counts and prefix hashes for reuse."""

from __future__ import annotations

from dataclasses import dataclass

from python_backend_utils.errors import CapacityError
from python_backend_utils.prefix_hashing import NO_HASH, block_hash, prefix_hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH


class BlockManager:
    """Owns which block holds what; knows nothing of the tensors themselves.

    Freed blocks keep their hash while they sit in the free list, oldest first, so a later
    request with the same prefix can take them back before they are reused.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered set
        self._by_hash: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix_blocks(self, token_ids: list[int]) -> list[int]:
        """Blocks already holding a prefix of `token_ids`, never including the block of the last token
        (its logits must be computed, and a shared block is never written)."""
        usable = (len(token_ids) - 1) // self.block_size
        found = []
        for h in prefix_hashes(token_ids[: usable * self.block_size], self.block_size):
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def can_allocate(self, token_ids: list[int], reuse_prefix: bool = True) -> bool:
        cached = self.cached_prefix_blocks(token_ids) if reuse_prefix else []
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return self.blocks_for(len(token_ids)) - len(cached) + revived <= self.num_free

    def allocate(self, token_ids: list[int], reuse_prefix: bool = True) -> tuple[list[int], int]:
        """Blocks for all of `token_ids`; returns (block table, number of tokens whose KV is already there)."""
        needed = self.blocks_for(len(token_ids))
        if needed > self.num_blocks:
            raise CapacityError(
                f"{len(token_ids)} tokens need {needed} KV blocks; this instance has {self.num_blocks}"
            )
        if not self.can_allocate(token_ids, reuse_prefix):
            raise CapacityError("not enough free KV blocks; call can_allocate first")
        table = self.cached_prefix_blocks(token_ids) if reuse_prefix else []
        for block_id in table:
            self._take(block_id)
        num_cached = len(table) * self.block_size
        while len(table) < needed:
            table.append(self._take_free())
        return table, num_cached

    def append_slot(self, block_table: list[int], num_tokens: int) -> bool:
        """Make room for token number `num_tokens` (1-based); False when no block is free."""
        if len(block_table) * self.block_size >= num_tokens:
            return True
        if not self._free:
            return False
        block_table.append(self._take_free())
        return True

    def register_full_blocks(
        self, block_table: list[int], token_ids: list[int], num_computed: int, chain: list[int]
    ) -> None:
        """Publish the hashes of blocks whose KV is now computed, so later prompts can reuse them.

        `chain` is the sequence's hash chain so far; it is extended in place so each block is hashed once.
        """
        for index in range(len(chain), num_computed // self.block_size):
            parent = chain[-1] if chain else NO_HASH
            expected = block_hash(parent, token_ids[index * self.block_size : (index + 1) * self.block_size])
            chain.append(expected)
            block = self.blocks[block_table[index]]
            if block.hash == expected:
                continue
            if block.hash != NO_HASH and self._by_hash.get(block.hash) == block.block_id:
                del self._by_hash[block.hash]
            block.hash = expected
            self._by_hash.setdefault(expected, block.block_id)

    def free(self, block_table: list[int]) -> None:
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        block_table.clear()

    def forget_hashes(self) -> None:
        """Drop every prefix entry (after a failed step the blocks' contents are not trusted)."""
        for block in self.blocks:
            block.hash = NO_HASH
        self._by_hash.clear()

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id = next(iter(self._free))
        del self._free[block_id]
        block = self.blocks[block_id]
        if block.hash != NO_HASH:
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash = NO_HASH
        block.ref_count = 1
        return block_id
