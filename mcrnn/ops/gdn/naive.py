"""Token-loop reference for Gated DeltaNet, literally SPEC §1: `S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`."""

from __future__ import annotations

import torch

from mcrnn.ops.delta.naive import check_beta
from mcrnn.ops.linear.chunk import check_state
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale


def check_decay(decay: torch.Tensor | None, B: int, T: int, H: int) -> None:
    if decay is None:
        raise ValueError("gate `decay` is required: a tensor of shape [B, T, H] in [0, 1] (without it, use delta)")
    check_gate("decay", decay, B, T, H)


def naive_gdn(
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
    """Same contract as :func:`mcrnn.ops.gdn.chunk_gdn`, one token at a time."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_beta(beta, B, T, H)
    check_decay(decay, B, T, H)
    check_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=dt)
    eye = torch.eye(K, dtype=dt, device=q.device)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt)
        b_t = beta[:, t].to(dt)[..., None, None]
        a_t = decay[:, t].to(dt)[..., None, None]
        kkT = k_t.unsqueeze(-1) * k_t.unsqueeze(-2)
        S = a_t * ((eye - b_t * kkT) @ S) + b_t * k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (S if output_final_state else None)
