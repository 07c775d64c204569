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


ISAS = [isa for isa in (1, 2) if isa <= cpu_kernels.BEST_ISA]  # AVX2, AVX-512: each the CPU has


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17, 300, 1100])  # past MKL_ROWS: MKL, unpacked
@pytest.mark.parametrize("out_features", [98, 64, 7])  # a partial last panel, whole panels, less than one
def test_packed_linear_equals_torch(isa, rows, out_features):
    generator = torch.Generator().manual_seed(rows * out_features)
    weight = torch.randn(out_features, 72, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, 72, generator=generator)
    got = cpu_kernels.packed_linear(x, cpu_kernels.pack(weight), out_features, None, bias, isa)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 7, 8, 33, 300])  # one tile widens in registers, more widen the panel once
def test_packed_int8_linear_equals_the_dequantized_product(isa, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randint(-127, 128, (98, 72), generator=generator, dtype=torch.int8)
    scale, bias = torch.rand(98, generator=generator) + 0.5, torch.randn(98, generator=generator)
    x = torch.randn(rows, 72, generator=generator)
    got = cpu_kernels.packed_linear(x, cpu_kernels.pack(weight), 98, scale, bias, isa)
    torch.testing.assert_close(got, F.linear(x, weight.float() * scale[:, None], bias), atol=1e-3, rtol=1e-5)


def test_int8_linear_is_within_quantization_error_of_fp32():
    from python_backend_utils.engine.linear import Int8Linear

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(98, 72, generator=generator), torch.randn(98, generator=generator)
    x = torch.randn(5, 72, generator=generator)
    linear = Int8Linear(weight, bias)
    assert linear.packed
    torch.testing.assert_close(linear(x), F.linear(x, linear.dequantized(), bias), atol=1e-4, rtol=1e-4)
    exact = F.linear(x, weight, bias)
    assert ((linear(x) - exact).norm() / exact.norm()).item() < 0.02
    assert not torch.equal(linear(x), exact)  # it really is the int8 weight


def test_a_packed_weight_gives_back_its_rows():
    from python_backend_utils.engine.linear import DenseLinear

    weight = torch.randn(70, 16)
    linear = DenseLinear(weight)
    assert linear.packed and linear.weight.shape == (3, 16, 32)
    rows = torch.tensor([0, 69, 31, 32, 5])
    assert torch.equal(linear.weight_rows(rows), weight[rows])
