"""Chunk-parallel Titans: a loop over mini-batches only (`mcrnn.ops.deep.scan`, `TitansMemory`)."""

from __future__ import annotations

import torch

from mcrnn.ops.deep.op import deep_op
from mcrnn.ops.titans.memory import TitansMemory

_MEMORY = TitansMemory()


def chunk_titans(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    lr: torch.Tensor | None,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    mini_batch: int = 16,
    scale: float | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    offset: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Titans: `S_t = η_t S_{t-1} - θ_t ∇_W ℓ(W_mb; k_t, v_t)`, `W_t = (1 - α_t) W_{t-1} + S_t`,
    `ℓ = ½‖f_W(k) - v‖²`, `o_t = f_{W_t}(scale · q_t)`, with `f_W(x) = x + W1 gelu(W2 x)` or `f_W(x) = W x`.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]` (`K == V` for the MLP).
        params: the learned initial weights, shared over the batch: `{"W1": [H, V, E], "W2": [H, E, K]}` or
            `{"W": [H, V, K]}`.
        lr: `θ_t`; momentum: `η_t`; forget: `α_t`; each `[B, T, H]` in [0, 1] (None: 1, 0, 0).
        mini_batch: gradients of a mini-batch of this many tokens are taken at the weights of its start.
        scale: multiplies q before the read; default 1.
        initial_state: `{"W1", "W2"}` (or `{"W"}`) `[B, H, ...]` current weights, optionally
            `"W1_mb", "W2_mb"` (the weights at the current mini-batch's start; default: the current weights)
            and the momentum `"S1", "S2"` (or `"S"`; default zero).
        offset: tokens already consumed in the current mini-batch, in `[0, mini_batch)` (see `chunk_dla`).
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the final state (all keys, float32 or
        float64 for float64 inputs).
    """
    return deep_op(
        _MEMORY, True, q, k, v, params, {"lr": lr, "momentum": momentum, "forget": forget},
        mini_batch=mini_batch, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, offset=offset,
    )
