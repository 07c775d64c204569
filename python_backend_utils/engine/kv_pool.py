"""The model's shape, and the paged KV cache's memory: one block-major tensor, read by the model as rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int


class KVPool:
    """One tensor, block-major: [num_blocks, num_layers, 2 (k, v), block_size, kv_heads, head_dim].

    A block (every layer's K and V for `block_size` tokens) is one contiguous piece of memory,
    which is what a KV transfer moves. For compute the pool is read as rows of kv_heads*head_dim.
    """

    def __init__(
        self, shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: str, allocate=None
    ) -> None:
        self.block_size = block_size
        self.num_layers = shape.num_layers
        dims = (num_blocks, shape.num_layers, 2, block_size, shape.num_kv_heads, shape.head_dim)
        if allocate is None:
            self.tensor = torch.zeros(dims, dtype=dtype, device=device)
        else:
            self.tensor = allocate(shape, num_blocks, block_size, dtype, device)
            if tuple(self.tensor.shape) != dims or self.tensor.dtype != dtype or not self.tensor.is_contiguous():
                raise ValueError(f"the pool allocator returned {tuple(self.tensor.shape)} {self.tensor.dtype}, "
                                 f"expected contiguous {dims} {dtype}")
        self.rows = self.tensor.view(-1, shape.num_kv_heads * shape.head_dim)
        self.rows_per_block = shape.num_layers * 2 * block_size

    @staticmethod
    def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return shape.num_layers * 2 * block_size * shape.num_kv_heads * shape.head_dim * element

    def base_rows(self, block_table: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Row of layer 0's K for each position; layer l's K is +2l*block_size, its V +(2l+1)*block_size."""
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.rows_per_block + positions % self.block_size
