"""Token-loop reference for (decayed) linear attention, literally SPEC §1."""

from __future__ import annotations

import torch

from mcrnn.ops.linear.chunk import check_state
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale


def naive_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`mcrnn.ops.linear.chunk_linear`, one token at a time."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_gate("decay", decay, B, T, H)
    check_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=dt)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt)
        a_t = decay[:, t].to(dt)[..., None, None] if decay is not None else 1.0
        S = a_t * S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (S if output_final_state else None)
