"""Gated DeltaNet (SPEC §1): `S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`, read `q_tᵀ S_t`."""

from mcrnn.ops.gdn.chunk import chunk_gdn
from mcrnn.ops.gdn.naive import naive_gdn

__all__ = ["chunk_gdn", "naive_gdn"]
