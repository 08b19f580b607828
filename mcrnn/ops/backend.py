"""Where an op runs: the Triton kernels (`mcrnn.ops.triton`, imported only here and only when asked) or PyTorch.

- "auto": the kernels for CUDA tensors when triton imports, else PyTorch;
- "torch": PyTorch always;
- "triton": the kernels wherever they can run (CPU tensors too when triton was imported with
  `TRITON_INTERPRET=1`, Triton's interpreter).

A call the kernels do not cover (dtype, dims, device) falls back to PyTorch in every mode.
"""

from __future__ import annotations

import os

import torch

#: the backends an op accepts; None resolves to the environment's MCRNN_BACKEND, else "auto"
BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str | None) -> str:
    """`backend` checked, or (None) the environment's `MCRNN_BACKEND`, else "auto"."""
    if backend is None:
        backend = os.environ.get("MCRNN_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"the environment's MCRNN_BACKEND={backend!r} is not one of {list(BACKENDS)}")
    elif backend not in BACKENDS:
        raise ValueError(f"unknown `backend` {backend!r}: choose one of {list(BACKENDS)} (or None)")
    return backend


def triton_kernels(backend: str, x: torch.Tensor):
    """The `mcrnn.ops.triton` module when `backend` asks for the kernels and they can run on `x`'s device;
    None otherwise (then the caller uses PyTorch)."""
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return None
    try:
        import mcrnn.ops.triton as kernels
    except ImportError:  # triton is an optional extra
        return None
    if not (x.is_cuda or kernels.INTERPRET):  # CPU tensors need triton imported with TRITON_INTERPRET=1
        return None
    return kernels
