"""Titans (SPEC §1): an MLP memory trained online on `ℓ = ½‖f_W(k_t) - v_t‖²` with momentum and forgetting."""

from mcrnn.ops.titans.chunk import chunk_titans
from mcrnn.ops.titans.naive import naive_titans

__all__ = ["chunk_titans", "naive_titans"]
