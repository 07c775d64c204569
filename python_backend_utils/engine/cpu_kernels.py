"""The optional C kernels of `_cpu_kernels.c`, with the tests for when they apply.

Built by `pip install` when a C compiler is there; without it (or on a GPU, or for shapes the
kernel does not cover) the model runs its torch path, which computes the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

try:
    from python_backend_utils.engine import _cpu_kernels
except ImportError:
    _cpu_kernels = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def decode_attention_applies(pool: torch.Tensor, head_dim: int) -> bool:
    return (_cpu_kernels is not None and pool.device.type == "cpu" and pool.dtype in KERNEL_DTYPES
            and pool.is_contiguous() and head_dim % 16 == 0)


def threads() -> int:
    """The engine's thread count (`num_threads`, which it gives torch): the kernels split their work as torch does."""
    return torch.get_num_threads()


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
            head_dim ** -0.5, threads())
    return out


# Output channels per panel of a packed weight (PANEL in _cpu_kernels.c); bf16 panels pad k to BF16_K.
PANEL = 32
BF16_K = 32
# What the CPU runs packed products with, each level implying the ones below it: AVX2 and FMA,
# AVX-512 (fp32 and int8 panels), AVX512-BF16 and AMX (bf16 panels); 0 for none (nothing is packed).
ISA_AVX2, ISA_AVX512, ISA_AVX512_BF16, ISA_AMX = 1, 2, 3, 4
BEST_ISA = _cpu_kernels.best_isa() if _cpu_kernels is not None else 0
# Panel kinds (KIND_* in _cpu_kernels.c).
KINDS = {torch.float32: 0, torch.int8: 1, torch.bfloat16: 2}


def packing_applies(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.dtype not in KINDS:
        return False
    return BEST_ISA >= (ISA_AVX512_BF16 if weight.dtype == torch.bfloat16 else ISA_AVX2)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] -> panels of PANEL output channels, each one sequential stream: [ceil(n / PANEL), k, PANEL]
    for fp32 and int8; for bf16 [ceil(n / PANEL), k2 / 2, PANEL, 2], k2 = k rounded up to BF16_K, pairs
    of k side by side (what VDPBF16PS and AMX's tiles multiply)."""
    n, k = weight.shape
    if weight.dtype == torch.bfloat16:
        padded = F.pad(weight, (0, (-k) % BF16_K, 0, (-n) % PANEL))
        return padded.view(-1, PANEL, padded.shape[1] // 2, 2).transpose(1, 2).contiguous()
    padded = torch.cat([weight, weight.new_zeros((-n) % PANEL, k)]) if n % PANEL else weight
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def unpack(panels: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [out_features, in_features] weight that `pack` made `panels` of (a copy)."""
    if panels.dtype == torch.bfloat16:
        return panels.transpose(1, 2).reshape(-1, panels.shape[1] * 2)[:out_features, :in_features].contiguous()
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features]


def unpack_rows(panels: torch.Tensor, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `rows` of the weight that `pack` made `panels` of: an embedding lookup in a tied LM head."""
    if panels.dtype == torch.bfloat16:
        return panels[rows // PANEL, :, rows % PANEL].reshape(len(rows), -1)[:, :in_features]
    return panels[rows // PANEL, :, rows % PANEL]


# Rows from which MKL's sgemm beats the kernel: for a prefill-sized product it is worth unpacking
# the weight for the call (the transposing copy costs ~15% of the product at 512 rows, ~3% at
# 2048), and on an AVX2-only CPU MKL multiplies the panels themselves better from 16 rows
# (benchmarks/RESULTS.md, section 7). Below MKL_ROWS the AVX-512 kernel is 0.9-1.0x MKL.
MKL_ROWS = 1024
AVX2_MKL_ROWS = 16
# Rows of x from which bf16 panels are multiplied with AMX tiles rather than VDPBF16PS.
AMX_ROWS = 16


def bf16_isa(rows: int) -> int:
    """The ISA that multiplies `rows` rows by bf16 panels fastest on this CPU."""
    return ISA_AMX if BEST_ISA == ISA_AMX and rows >= AMX_ROWS else ISA_AVX512_BF16


def packed_linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, scale: torch.Tensor | None,
                  bias: torch.Tensor | None, isa: int | None = None) -> torch.Tensor:
    """(x @ weight^T) * scale + bias: x [m, k] contiguous, panels from `pack`, scale and bias fp32
    [out_features] or None. fp32 and int8 panels take and give fp32; bf16 panels take fp32 or bf16 and
    give x's dtype. `isa` forces a path (tests); by default the fastest for the CPU and the rows."""
    rows, in_features = x.shape
    is_bf16 = panels.dtype == torch.bfloat16
    if isa is None:
        isa = bf16_isa(rows) if is_bf16 else BEST_ISA
    if panels.dtype == torch.float32 and rows >= MKL_ROWS:
        return F.linear(x, unpack(panels, out_features, in_features), bias)
    if panels.dtype == torch.float32 and isa == ISA_AVX2 and rows >= AVX2_MKL_ROWS:
        out = torch.matmul(x, panels).transpose(0, 1).reshape(rows, -1)[:, :out_features]
        return out + bias if bias is not None else out.contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype if is_bf16 else torch.float32)
    if not rows:
        return out
    with record_function("cpu_kernels::packed_gemm"):  # named in profiles (benchmarks.profile_engine)
        _cpu_kernels.packed_linear(x.data_ptr(), panels.data_ptr(), KINDS[panels.dtype],
                                   0 if scale is None else scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                   out.data_ptr(), rows, out_features, in_features, isa, threads(),
                                   x.dtype == torch.bfloat16, out.dtype == torch.bfloat16)
    return out


# The word each field of a layer takes in decode_layers' table (the enum in _cpu_kernels.c).
LAYER_FIELDS = ("input_norm", "post_norm", "q_norm", "k_norm", "qkv", "qkv_scale", "qkv_bias", "o", "o_scale",
                "gate_up", "gate_up_scale", "down", "down_scale")


def layer_table(layers: list[dict[str, torch.Tensor | None]]) -> torch.Tensor:
    """int64 [layers, fields]: each tensor's address (0 for None), for decode_layers. The caller keeps them alive."""
    return torch.tensor([[0 if layer[name] is None else layer[name].data_ptr() for name in LAYER_FIELDS]
                         for layer in layers], dtype=torch.int64)


def decode_layers_applies(rows: int) -> bool:
    """Whether a decode-only step of `rows` sequences runs in decode_layers: its products run in the kernel."""
    return BEST_ISA >= ISA_AVX512 or rows < AVX2_MKL_ROWS


def decode_layers(table: torch.Tensor, weight_dtype: torch.dtype, state: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, rows: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor,
                  lengths: torch.Tensor, heads: int, kv_heads: int, head_dim: int, intermediate: int, block_size: int,
                  eps: float) -> None:
    """Every layer of a decode-only step, in place on `state` (fp32 [tokens, hidden], the embeddings in).

    weight_dtype: the panels' (fp32, int8 or bf16); the norms and biases in the table are fp32.
    cos, sin: fp32 [tokens, head_dim]; rows: int64 [tokens] pool row of layer 0's K for each token;
    tables, lengths: as for decode_attention."""
    isa = bf16_isa(state.shape[0]) if weight_dtype == torch.bfloat16 else BEST_ISA
    with record_function("cpu_kernels::decode_layers"):
        _cpu_kernels.decode_layers(
            table.data_ptr(), KINDS[weight_dtype], state.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows.data_ptr(),
            pool.data_ptr(), pool.dtype == torch.bfloat16, tables.data_ptr(), lengths.data_ptr(), state.shape[0],
            state.shape[1], heads, kv_heads, head_dim, intermediate, table.shape[0], block_size, tables.shape[1],
            eps, isa, threads())


def shared_memory_sync_applies() -> bool:
    """Whether shm_all_reduce.py can synchronise its ranks (the flags' fences are in the C kernels)."""
    return _cpu_kernels is not None


def shm_publish(slot: torch.Tensor, tensor: torch.Tensor, flag_address: int, call: int) -> None:
    """Copy `tensor` into `slot` (same size, contiguous), then store `call` at `flag_address` after the copy."""
    _cpu_kernels.shm_publish(slot.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                             flag_address, call)


def shm_wait(flags_address: int, stride: int, count: int, call: int, spins: int) -> bool:
    """True once all `count` int64 flags, `stride` int64s apart, hold `call` or more; False after `spins` checks."""
    return _cpu_kernels.shm_wait(flags_address, stride, count, call, spins)
