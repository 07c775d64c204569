"""The model's matrix products: dense weights, or int8 weights for CPU decode.

A decode step streams every weight matrix once for a handful of rows. In fp32 that is 4 bytes a
parameter; with `weight_quantization = "int8"` each output channel of a weight is stored as int8
with its own scale (1 byte a parameter) and, below PREFILL_ROWS rows, the C kernel multiplies
the fp32 activations by it directly (`cpu_kernels.int8_linear`). Activations stay fp32: quantizing
them too (fbgemm's dynamic linear) loses the outlier channels of models like the default one, and
its answers change. Larger products (prefill) widen the weight to fp32 for the call, where the
time goes to arithmetic rather than to reading weights. The embedding and norms stay in the
model's dtype; benchmarks/RESULTS.md states the accuracy cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from python_backend_utils.engine import cpu_kernels

# Rows from which widening the weight for MKL beats the int8 kernel (benchmarks/RESULTS.md).
PREFILL_ROWS = 64
# Rows for which the fp32 kernel beats MKL's sgemm, which packs the weight on every call: 1.2-1.3x
# at 4-8 rows here; at 1-2 rows both stream the weight at the same pace, past 12 MKL wins.
SKINNY_FP32_ROWS = range(4, 13)


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.uses_kernel = cpu_kernels.fp32_linear_applies(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel and x.dim() == 2 and x.shape[0] in SKINNY_FP32_ROWS:
            return cpu_kernels.fp32_linear(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


class Int8Linear:
    """fp32 in, fp32 out; int8 weights with one scale per output channel (symmetric)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        weight = weight.detach().float()
        self.scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).contiguous()
        self.weight = (weight / self.scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.uses_kernel = cpu_kernels.int8_linear_applies(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        if self.uses_kernel and rows.shape[0] < PREFILL_ROWS:
            out = cpu_kernels.int8_linear(rows, self.weight, self.scale, self.bias)
        else:
            out = F.linear(rows, self.weight.float() * self.scale[:, None], self.bias)
        return out.view(*x.shape[:-1], -1).to(x.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.bias) if t is not None)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str) -> DenseLinear | Int8Linear:
    return Int8Linear(weight, bias) if quantization == "int8" else DenseLinear(weight, bias)
