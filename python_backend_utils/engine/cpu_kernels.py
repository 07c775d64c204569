"""The optional C kernels of `_cpu_kernels.c`, with the tests for when they apply.

Built by `pip install` when a C compiler is there; without it (or on a GPU, or for shapes the
kernel does not cover) the model runs its torch path, which computes the same thing.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

try:
    from python_backend_utils.engine import _cpu_kernels
except ImportError:
    _cpu_kernels = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def decode_attention_applies(pool: torch.Tensor, head_dim: int) -> bool:
    return (_cpu_kernels is not None and pool.device.type == "cpu" and pool.dtype in KERNEL_DTYPES
            and pool.is_contiguous() and head_dim % 16 == 0)


def decode_attention(query: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                     layer: int, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V for one new token per sequence, K and V read from the pool's blocks.

    query: [batch, heads, head_dim]; tables: int32 [batch, width] block ids; lengths: int32 [batch]
    tokens of context, the new one included (its K and V already written)."""
    batch, heads, head_dim = query.shape
    query = query.to(torch.float32).contiguous()
    out = torch.empty_like(query)
    with record_function("cpu_kernels::paged_attention"):  # named in profiles (benchmarks.profile_engine)
        _cpu_kernels.decode_attention(
            query.data_ptr(), pool.data_ptr(), pool.dtype == torch.bfloat16, tables.data_ptr(), lengths.data_ptr(),
            out.data_ptr(), batch, heads, num_kv_heads, head_dim, block_size, layer, pool.shape[1], tables.shape[1],
            head_dim ** -0.5)
    return out


def int8_linear_applies(weight: torch.Tensor) -> bool:
    return (_cpu_kernels is not None and weight.device.type == "cpu" and weight.dtype == torch.int8
            and weight.shape[0] % 2 == 0 and weight.shape[1] % 8 == 0)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x @ weight^T) * scale + bias: x fp32 [m, k] contiguous, weight int8 [n, k], scale and bias fp32 [n]."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    with record_function("cpu_kernels::int8_gemm"):
        _cpu_kernels.int8_linear(x.data_ptr(), weight.data_ptr(), scale.data_ptr(),
                                 0 if bias is None else bias.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0],
                                 weight.shape[1])
    return out


def fp32_linear_applies(weight: torch.Tensor) -> bool:
    return (_cpu_kernels is not None and _cpu_kernels.has_avx2() and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.is_contiguous() and weight.dim() == 2
            and weight.shape[0] % 2 == 0 and weight.shape[1] % 8 == 0)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias for fp32 x [m, k] contiguous, weight [n, k] contiguous, bias [n]."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    with record_function("cpu_kernels::skinny_gemm"):
        _cpu_kernels.fp32_linear(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                 out.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1])
    return out
