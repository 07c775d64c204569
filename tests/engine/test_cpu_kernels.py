"""The C decode attention equals torch's attention over the same KV gathered out of the pool."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from python_backend_utils.engine import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels._cpu_kernels is None, reason="the C kernels were not built")

LAYERS, BLOCK, KV_HEADS, HEADS, DIM = 3, 4, 2, 6, 32


def reference(query, pool, tables, lengths, layer):
    outputs = []
    for row, length in enumerate(lengths.tolist()):
        blocks = tables[row, : (length + BLOCK - 1) // BLOCK].long()
        keys = pool[blocks, layer, 0].reshape(-1, KV_HEADS, DIM)[:length].float()
        values = pool[blocks, layer, 1].reshape(-1, KV_HEADS, DIM)[:length].float()
        out = F.scaled_dot_product_attention(query[row].unsqueeze(1), keys.transpose(0, 1), values.transpose(0, 1),
                                             enable_gqa=True)
        outputs.append(out.squeeze(1))
    return torch.stack(outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_the_pool_in_place(dtype):
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(20, LAYERS, 2, BLOCK, KV_HEADS, DIM, generator=generator).to(dtype)
    lengths = torch.tensor([1, 5, 13, 8], dtype=torch.int32)
    tables = torch.stack([torch.randperm(20, generator=generator)[:4] for _ in lengths]).to(torch.int32)
    query = torch.randn(len(lengths), HEADS, DIM, generator=generator)
    assert cpu_kernels.decode_attention_applies(pool, DIM)
    for layer in range(LAYERS):
        got = cpu_kernels.decode_attention(query, pool, tables, lengths, layer, KV_HEADS, BLOCK)
        torch.testing.assert_close(got, reference(query, pool, tables, lengths, layer), atol=1e-5, rtol=1e-4)


def test_shapes_the_kernel_does_not_cover_take_the_torch_path():
    assert not cpu_kernels.decode_attention_applies(torch.zeros(2, 1, 2, 4, 1, 24), 24)
    assert not cpu_kernels.decode_attention_applies(torch.zeros(2, 1, 2, 4, 1, 32, dtype=torch.float16), 32)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 33, 64])
def test_int8_linear_equals_the_dequantized_product(rows):
    from python_backend_utils.engine.linear import PREFILL_ROWS, Int8Linear

    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(98, 72, generator=generator), torch.randn(98, generator=generator)
    x = torch.randn(rows, 72, generator=generator)
    linear = Int8Linear(weight, bias)
    assert linear.uses_kernel
    dequantized = linear.weight.float() * linear.scale[:, None]
    torch.testing.assert_close(linear(x), F.linear(x, dequantized, bias), atol=1e-4, rtol=1e-4)
    # Quantization itself costs little: per-channel int8 is within a few percent of the fp32 product.
    exact = F.linear(x, weight, bias)
    assert ((linear(x) - exact).norm() / exact.norm()).item() < 0.02
    if rows < PREFILL_ROWS:
        assert not torch.equal(linear(x), F.linear(x, weight, bias))  # it really is the int8 weight


@pytest.mark.parametrize("rows", [4, 7, 12])
def test_fp32_linear_equals_torch(rows):
    from python_backend_utils.engine.linear import SKINNY_FP32_ROWS, DenseLinear

    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(98, 72, generator=generator), torch.randn(98, generator=generator)
    x = torch.randn(rows, 72, generator=generator)
    linear = DenseLinear(weight, bias)
    assert linear.uses_kernel and rows in SKINNY_FP32_ROWS
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
