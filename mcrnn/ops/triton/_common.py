"""Shared by the kernels: the interpreter switch, block sizes, dtype rules and argument checks.

Triton fixes "compile for a GPU" or "interpret on the CPU" per process, when `triton` is first imported (its
own `tl.sum`, `tl.max`... are decorated then): `TRITON_INTERPRET=1` must be in the environment before the
first `import triton` (and so before `import mcrnn.ops.triton`, or `torch._dynamo`, which imports triton) for
the kernels to run on CPU tensors. Our kernels are decorated in whatever mode triton was imported in.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

#: the kernels of this process run in Triton's interpreter (numpy on the CPU) instead of compiled on a GPU
INTERPRET: bool = isinstance(tl.standard.cdiv, InterpretedFunction)


@contextlib.contextmanager
def triton_import_mode():
    """Decorate kernels in the mode `triton` itself was imported in, whatever the environment says now."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before

#: largest head dim (K, V or the score dim) the kernels keep in one block; larger dims go to the torch path
MAX_HEAD_DIM = 256

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block(n: int) -> int:
    """A power of two >= n and >= 16 (`tl.arange` needs powers of two, `tl.dot` dims >= 16): the kernels
    pad small or odd dims with masked loads instead of copying the tensors."""
    return max(16, triton.next_power_of_2(n))


def low_precision_dot(dtype: torch.dtype) -> bool:
    """Feed `tl.dot` bf16/fp16 operands (float32 accumulation) for bf16/fp16 inputs on a GPU.

    The interpreter computes bf16 arithmetic wrongly (numpy has no bf16), so it always multiplies in float32:
    the interpreter tests check the kernels' logic, the `gpu` tests the low-precision dot."""
    return dtype in (torch.bfloat16, torch.float16) and not INTERPRET


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write a result of `dtype` in: the interpreter rounds float32 to bf16/fp16 by
    truncation (the GPU rounds to nearest even), so there the kernels write float32 and torch rounds."""
    return torch.float32 if INTERPRET else dtype


def empty_for(x: torch.Tensor) -> torch.Tensor:
    """An output buffer for the gradient of (or a result shaped like) `x`; `.to(x.dtype)` it afterwards."""
    return torch.empty(x.shape, dtype=store_dtype(x.dtype), device=x.device)


#: launch settings per kernel kind on a GPU (`num_warps`, `num_stages`). Fixed rather than autotuned: an
#: autotuner compiles every candidate at the first call of each shape class, minutes of compilation for the
#: GPU check; the values are first guesses for H100/H200 with K = V = 128, to be tuned by benchmarks/gpu.py.
LAUNCH = {
    "fwd": (4, 2),  # [64, K] x [K, 64] per cache, value-block split
    "bwd_tokens": (8, 2),  # [64, V] x [V, K] per cache, full K and V in one program
    "bwd_caches": (8, 2),  # [K, 64] x [64, 64] per token tile, a [K, 64] float32 accumulator
    "ssc_fwd": (4, 2),  # [64, K] x [K, 64] per tile of gathered queries
    "ssc_bwd": (8, 2),  # two products per tile and a [K, 64] float32 accumulator
    "scan_states": (8, 2),  # a [K, 64] float32 state, one [K, 64] x [64, 64] product per chunk, sequential
    "scan_out": (4, 2),  # [64, K] x [K, 64] twice and a [64, 64] score tile per chunk
    "scan_snap": (8, 2),  # one chunk's prefix into a [K, 64] state tile
    "scan_bwd_states": (8, 2),  # a [K, 64] float32 gradient, sequential over the chunks in reverse
    "scan_bwd_dv": (8, 2),  # like scan_out, plus the [K, 64] end-state gradient tile
    "scan_bwd_dqk": (8, 2),  # [64, 64] accumulators dA, dq, dk over the value blocks (a key block of 64)
}


def launch_options(kind: str) -> dict:
    num_warps, num_stages = LAUNCH[kind]
    return {"num_warps": num_warps, "num_stages": num_stages}


def unsupported_reason(*tensors: torch.Tensor | None, dims: tuple[int, ...] = ()) -> str | None:
    """Why the kernels cannot take these tensors (None when they can): a dispatcher falls back to torch then."""
    present = [x for x in tensors if x is not None]
    for x in present:
        if x.dtype not in INPUT_DTYPES:
            return f"dtype {x.dtype} (the kernels take float32, bfloat16, float16)"
    device = present[0].device
    if any(x.device != device for x in present):
        return "tensors on different devices"
    if device.type == "cpu" and not INTERPRET:
        return "CPU tensors need TRITON_INTERPRET=1 in the environment before triton is first imported"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type}"
    if any(d > MAX_HEAD_DIM for d in dims):
        return f"a head dim above {MAX_HEAD_DIM}: {dims}"
    return None


def check_shape(name: str, x: torch.Tensor | None, shape: tuple, fix: str = "") -> None:
    if x is None:
        raise ValueError(f"`{name}` is required here{': ' + fix if fix else ''}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(x.shape)}{'; ' + fix if fix else ''}")
