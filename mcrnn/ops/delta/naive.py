"""Token-loop reference for DeltaNet, literally SPEC §1: `S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ`."""

from __future__ import annotations

import torch

from mcrnn.ops.linear.chunk import check_state
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale

BETA_RANGE = (0.0, 2.0)  # [0, 1] by default; up to 2 when the layer allows negative eigenvalues


def check_beta(beta: torch.Tensor | None, B: int, T: int, H: int) -> None:
    if beta is None:
        raise ValueError("gate `beta` is required: a tensor of shape [B, T, H] in [0, 2] (e.g. a sigmoid)")
    check_gate("beta", beta, B, T, H, *BETA_RANGE)


def naive_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`mcrnn.ops.delta.chunk_delta`, one token at a time."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_beta(beta, B, T, H)
    check_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=dt)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt)
        b_t = beta[:, t].to(dt)[..., None]
        error = v_t - torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory gets wrong about v_t
        S = S + k_t.unsqueeze(-1) * (b_t * error).unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (S if output_final_state else None)
