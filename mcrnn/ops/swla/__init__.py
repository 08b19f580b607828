"""Sliding-window linear attention with window 2: `S_t = a_t S_{t-1} + b_t k_{t-1} v_{t-1}ᵀ + c_t k_t v_tᵀ`."""

from mcrnn.ops.swla.chunk import chunk_swla, swla_scan
from mcrnn.ops.swla.naive import naive_swla

__all__ = ["chunk_swla", "naive_swla", "swla_scan"]
