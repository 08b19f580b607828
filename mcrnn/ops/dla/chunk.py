"""Chunk-parallel deep linear attention: a loop over mini-batches only (`mcrnn.ops.deep.scan`, `DLAMemory`)."""

from __future__ import annotations

import torch

from mcrnn.ops.deep.op import deep_op
from mcrnn.ops.dla.memory import DLAMemory

_MEMORY = DLAMemory()


def chunk_dla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    lr: torch.Tensor | None,
    decay: torch.Tensor | None = None,
    mini_batch: int = 16,
    scale: float | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    offset: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Deep linear attention: `W_t = a_t W_{t-1} - θ_t ∇_W ℓ(W_mb; k_t, v_t)`, `ℓ = -<f_W(k), v>`,
    `o_t = f_{W_t}(scale · q_t)`, with `f_W(x) = x + W1 gelu(W2 x)` or `f_W(x) = W x`.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]` (`K == V` for the MLP).
        params: the learned initial weights, shared over the batch: `{"W1": [H, V, E], "W2": [H, E, K]}` or
            `{"W": [H, V, K]}`.
        lr: `θ_t`, `[B, T, H]` in [0, 1] (None: 1). decay: `a_t`, `[B, T, H]` in [0, 1] (None: 1).
        mini_batch: gradients of a mini-batch of this many tokens are taken at the weights of its start.
        scale: multiplies q before the read; default 1.
        initial_state: `{"W1", "W2"}` (or `{"W"}`) `[B, H, ...]` current weights, optionally
            `"W1_mb", "W2_mb"` (the weights at the current mini-batch's start; default: the current weights).
        offset: tokens already consumed in the current mini-batch, in `[0, mini_batch)`: the call continues it
            (chaining `x[:t1]` with `offset=0` then `x[t1:]` with `offset=t1 % mini_batch` equals one call).
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the final state (same keys, all of them,
        float32 or float64 for float64 inputs).
    """
    return deep_op(
        _MEMORY, True, q, k, v, params, {"lr": lr, "decay": decay}, mini_batch=mini_batch, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, offset=offset,
    )
