"""DeltaNet (SPEC §1): `S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`, read `q_tᵀ S_t`."""

from mcrnn.ops.delta.chunk import chunk_delta, delta_scan
from mcrnn.ops.delta.naive import naive_delta

__all__ = ["chunk_delta", "naive_delta", "delta_scan"]
