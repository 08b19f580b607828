"""Token-loop reference for deep linear attention: one `DLAMemory.step` (explicit gradient) per token."""

from __future__ import annotations

import torch

from mcrnn.ops.deep.op import deep_op
from mcrnn.ops.dla.memory import DLAMemory

_MEMORY = DLAMemory()


def naive_dla(
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
    """Same contract as :func:`mcrnn.ops.dla.chunk_dla`, one token at a time."""
    return deep_op(
        _MEMORY, False, q, k, v, params, {"lr": lr, "decay": decay}, mini_batch=mini_batch, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, offset=offset,
    )
