"""Deep linear attention (SPEC §1): an MLP memory trained online on `ℓ = -<f_W(k_t), v_t>` with decay."""

from mcrnn.ops.dla.chunk import chunk_dla
from mcrnn.ops.dla.naive import naive_dla

__all__ = ["chunk_dla", "naive_dla"]
