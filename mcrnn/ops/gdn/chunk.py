"""Chunk-parallel Gated DeltaNet: the delta-rule scan (`mcrnn.ops.delta.chunk.delta_scan`) with a log decay."""

from __future__ import annotations

import torch

from mcrnn.ops.delta.chunk import delta_scan
from mcrnn.ops.delta.naive import check_beta
from mcrnn.ops.gdn.naive import check_decay
from mcrnn.ops.linear.chunk import _log_decay, check_state
from mcrnn.ops.utils import check_qkv, compute_dtype, default_scale, to_heads_first


def chunk_gdn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet, chunk-parallel: `S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`, `o_t = scale · q_tᵀ S_t`.

    Args:
        q, k: `[B, T, H, K]` (the layer ℓ2-normalises them); v: `[B, T, H, V]`.
        beta: `[B, T, H]` writing strength in [0, 1] (up to 2 for negative eigenvalues).
        decay: `[B, T, H]` gate `a_t` in [0, 1].
        scale: multiplies q; default `K ** -0.5`.
        initial_state: `[B, H, K, V]`.
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the final state `[B, H, K, V]` (float32,
        or float64 for float64 inputs).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    check_beta(beta, B, T, H)
    check_decay(decay, B, T, H)
    check_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    s0 = initial_state.to(dt) if initial_state is not None else None
    o, _, final = delta_scan(
        to_heads_first(q, dt) * scale, to_heads_first(k, dt), to_heads_first(v, dt), to_heads_first(beta, dt),
        _log_decay(to_heads_first(decay, dt)), initial_state=s0,
    )
    return o.transpose(1, 2).to(q.dtype), (final if output_final_state else None)
