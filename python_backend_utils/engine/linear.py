"""The model's matrix products: dense weights, or int8 weights for CPU decode.

On a CPU with AVX2 or AVX-512 (and the C kernels built), every weight is packed once, at load,
in panels of output channels (`cpu_kernels.pack`), and every product runs in the C kernel: a
decode step streams each weight once for a handful of rows, which MKL's sgemm does at a fraction
of the memory's pace because it re-packs the weight on every call (benchmarks/RESULTS.md,
section 7); for a prefill's hundreds of rows the kernel is within a few percent of MKL. Elsewhere
(a GPU, or no kernel) the weight stays [n, k] and F.linear runs. bf16 weights are packed where the
CPU multiplies bf16 (AVX512-BF16 or AMX): half the bytes of fp32 to stream at decode, and AMX's
tiles for prefill.

With `weight_quantization = "int8"` each output channel is stored as int8 with its own scale (1
byte a parameter instead of 4) and the kernel multiplies the fp32 activations by it directly.
Activations stay fp32: quantizing them too (fbgemm's dynamic linear) loses the outlier channels of
models like the default one, and its answers change. The embedding and norms stay in the model's
dtype; benchmarks/RESULTS.md states the accuracy cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from python_backend_utils.engine import cpu_kernels


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


class DenseLinear:
    """fp32 or bf16 weights; packed, the bias is kept in fp32 (the kernel adds it before rounding)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = weight.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.packing_applies(weight)
        self.bias = bias.float().contiguous() if self.packed and bias is not None else bias
        self.weight = cpu_kernels.pack(weight) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            out = cpu_kernels.packed_linear(_rows(x), self.weight, self.out_features, None, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the [n, k] weight: the embedding lookup of a tied LM head."""
        if self.packed:
            return cpu_kernels.unpack_rows(self.weight, rows, self.in_features)
        return F.embedding(rows, self.weight)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


class Int8Linear:
    """fp32 in, fp32 out; int8 weights with one scale per output channel (symmetric)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).contiguous()
        quantized = (weight / self.scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.packed = cpu_kernels.packing_applies(quantized)
        self.weight = cpu_kernels.pack(quantized) if self.packed else quantized

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x.float())
        if self.packed:
            out = cpu_kernels.packed_linear(rows, self.weight, self.out_features, self.scale, self.bias)
        else:
            out = F.linear(rows, self.dequantized(), self.bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 [n, k] weight this layer multiplies by."""
        weight = cpu_kernels.unpack(self.weight, self.out_features, self.in_features) if self.packed else self.weight
        return weight.float() * self.scale[:, None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.bias) if t is not None)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str) -> DenseLinear | Int8Linear:
    return Int8Linear(weight, bias) if quantization == "int8" else DenseLinear(weight, bias)
