"""The C kernels against torch: decode attention over the pool, and the packed products on every path this
CPU has (AMX, AVX512-BF16, AVX-512, AVX2), each forced in turn; threads change nothing but the speed."""

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


ISAS = [isa for isa in (cpu_kernels.ISA_AVX2, cpu_kernels.ISA_AVX512) if isa <= cpu_kernels.BEST_ISA]
BF16_ISAS = [isa for isa in (cpu_kernels.ISA_AVX512_BF16, cpu_kernels.ISA_AMX) if isa <= cpu_kernels.BEST_ISA]
# The model's products (QKV, output, gate/up, down of the default model), at the rows where the paths and
# tiles change, and odd ones at 1-33 rows: k not a multiple of AMX's 32 nor even, n not a multiple of the
# panel, fewer columns than one panel.
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
BF16_SHAPES = MODEL_SHAPES + [(98, 72), (7, 33), (45, 100)]


@pytest.fixture
def threads():
    """Sets torch's (and so the kernels') thread count for a test, and puts it back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


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


@pytest.mark.skipif(not BF16_ISAS, reason="this CPU multiplies no bf16 (neither AVX512-BF16 nor AMX)")
@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("out_features, in_features", BF16_SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_packed_bf16_linear_equals_the_product_of_the_rounded_operands(isa, out_features, in_features, x_dtype):
    """bf16 panels: x rounded to bf16, products summed in fp32; out in x's dtype. Rows 1-33 and a prefill's 300."""
    generator = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=generator)
    panels = cpu_kernels.pack(weight)
    all_rows = [1, 7, 8, 9, 15, 16, 17, 32, 33, 300] if (out_features, in_features) in MODEL_SHAPES else range(1, 34)
    for rows in all_rows:
        x = torch.randn(rows, in_features, generator=generator).to(x_dtype)
        got = cpu_kernels.packed_linear(x, panels, out_features, None, bias, isa)
        expected = F.linear(x.to(torch.bfloat16).float(), weight.float(), bias)
        assert got.dtype == x_dtype
        tolerance = {"atol": 1e-4, "rtol": 1e-5} if x_dtype == torch.float32 else {"atol": 0.05, "rtol": 0.01}
        torch.testing.assert_close(got.float(), expected, **tolerance, msg=lambda m, rows=rows: f"rows {rows}: {m}")


@pytest.mark.skipif(not BF16_ISAS, reason="this CPU multiplies no bf16 (neither AVX512-BF16 nor AMX)")
def test_a_packed_bf16_weight_gives_back_its_rows_and_itself():
    from python_backend_utils.engine.linear import DenseLinear

    weight = torch.randn(70, 40).to(torch.bfloat16)
    linear = DenseLinear(weight)
    assert linear.packed and linear.weight.shape == (3, 32, 32, 2)  # k padded to 64, in pairs
    rows = torch.tensor([0, 69, 31, 32, 5])
    assert torch.equal(linear.weight_rows(rows), weight[rows])
    assert torch.equal(cpu_kernels.unpack(linear.weight, 70, 40), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows", [1, 8, 33, 300])
def test_two_threads_give_the_same_product_bit_for_bit(dtype, rows, threads):
    """Threads split the panels: each output is the same sum in the same order."""
    if not cpu_kernels.packing_applies(torch.zeros(1, 1, dtype=dtype)):
        pytest.skip(f"this CPU does not pack {dtype}")
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randint(-127, 128, (200, 96), generator=generator, dtype=torch.int8) if dtype == torch.int8
              else torch.randn(200, 96, generator=generator).to(dtype))
    scale = torch.rand(200, generator=generator) + 0.5 if dtype == torch.int8 else None
    x, panels = torch.randn(rows, 96, generator=generator), cpu_kernels.pack(weight)
    outputs = []
    for count in (1, 2):
        threads(count)
        outputs.append(cpu_kernels.packed_linear(x, panels, 200, scale, None))
    assert torch.equal(*outputs)


def test_two_threads_give_the_same_decode_attention_bit_for_bit(threads):
    generator = torch.Generator().manual_seed(1)
    pool = torch.randn(20, LAYERS, 2, BLOCK, KV_HEADS, DIM, generator=generator)
    lengths = torch.tensor([1, 5, 13, 8, 16], dtype=torch.int32)
    tables = torch.stack([torch.randperm(20, generator=generator)[:4] for _ in lengths]).to(torch.int32)
    query = torch.randn(len(lengths), HEADS, DIM, generator=generator)
    outputs = []
    for count in (1, 2):
        threads(count)
        outputs.append(cpu_kernels.decode_attention(query, pool, tables, lengths, 1, KV_HEADS, BLOCK))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_picks_the_same_greedy_tokens_on_one_and_two_threads(dtype, tmp_path, threads):
    from python_backend_utils.engine.config import EngineConfig
    from python_backend_utils.engine.engine import LLMEngine
    from python_backend_utils.engine.sampling_params import SamplingParams
    from tests.engine.checkpoints import build_tiny_checkpoint, run_to_completion, tokens_of

    directory = str(build_tiny_checkpoint("qwen2", tmp_path / "qwen2"))
    runs = []
    for count in (1, 2):
        engine = LLMEngine(EngineConfig(model_dir=directory, num_kv_blocks=64, block_size=4, num_threads=count,
                                        dtype=dtype))
        for index, prompt in enumerate(([5, 6, 7], [9] * 11, list(range(20, 57)))):
            engine.add_request(f"r{index}", prompt, SamplingParams(max_tokens=16, ignore_eos=True))
        outputs = run_to_completion(engine)
        runs.append({name: tokens_of(output) for name, output in outputs.items()})
    assert runs[0] == runs[1]
    assert all(len(tokens) == 16 for tokens in runs[0].values())
