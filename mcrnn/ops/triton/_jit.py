"""Small `@triton.jit` helpers shared by the kernels (imported only inside `triton_import_mode`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def operand(x, dtype, LOW_DOT: tl.constexpr):
    """A `tl.dot` operand: bf16/fp16 (`dtype`, the inputs') on a GPU, float32 otherwise. Tiles stay in this
    form in registers (half the registers of float32 for bf16 inputs); elementwise math converts to float32."""
    if LOW_DOT:
        return x.to(dtype)
    else:
        return x.to(tl.float32)


@triton.jit
def dot(a, b, LOW_DOT: tl.constexpr):
    if LOW_DOT:
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision="ieee")
