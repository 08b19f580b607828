"""Token-loop reference for sliding-window (window 2) linear attention, literally SPEC §1."""

from __future__ import annotations

import torch

from mcrnn.ops.swla.chunk import check_swla_state
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale


def naive_swla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    cur: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Same contract as :func:`mcrnn.ops.swla.chunk_swla`, one token at a time."""
    B, T, H, K, V = check_qkv(q, k, v)
    for name, g in (("decay", decay), ("prev", prev), ("cur", cur)):
        check_gate(name, g, B, T, H)
    check_swla_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    if initial_state is not None:
        S, k_prev, v_prev = (initial_state[n].to(dt) for n in ("S", "k", "v"))
    else:
        S = q.new_zeros(B, H, K, V, dtype=dt)
        k_prev, v_prev = q.new_zeros(B, H, K, dtype=dt), q.new_zeros(B, H, V, dtype=dt)

    def gate(g: torch.Tensor | None, t: int) -> torch.Tensor | float:
        return g[:, t].to(dt)[..., None, None] if g is not None else 1.0

    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt)
        S = (
            gate(decay, t) * S
            + gate(prev, t) * k_prev.unsqueeze(-1) * v_prev.unsqueeze(-2)
            + gate(cur, t) * k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        )
        k_prev, v_prev = k_t, v_t
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, ({"S": S, "k": k_prev, "v": v_prev} if output_final_state else None)
