"""Linear attention with an optional scalar decay (RetNet / Mamba-2-style gating): `S_t = a_t S_{t-1} + k_t v_tᵀ`."""

from mcrnn.ops.linear.chunk import chunk_linear, linear_scan
from mcrnn.ops.linear.naive import naive_linear

__all__ = ["chunk_linear", "naive_linear", "linear_scan"]
