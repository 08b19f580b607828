"""The public deep-memory ops (`chunk_dla`, `naive_titans`, ...) in fla's layout: validate, convert to heads-first
compute dtype, then run the memory's chunk-parallel scan or its token loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mcrnn.ops.deep.checks import check_mini_batch, check_offset, check_params
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale, to_heads_first

if TYPE_CHECKING:
    from mcrnn.ops.deep.memory import DeepMemory
    from mcrnn.ops.memory import State


def deep_op(
    memory: DeepMemory, chunked: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict,
    gates: dict[str, torch.Tensor | None], *, mini_batch: int, scale: float | None,
    initial_state: State | None, output_final_state: bool, offset: int,
) -> tuple[torch.Tensor, State | None]:
    """`q, k: [B, T, H, K]`, `v: [B, T, H, V]`, gates `[B, T, H]` (None: the gate's default) -> `o: [B, T, H, V]`
    in q's dtype and the final state (float32, float64 for float64 inputs) if `output_final_state`.

    `chunked=False` is the reference: one :meth:`~mcrnn.ops.memory.Memory.step` (an explicit gradient step)
    and one read per token, sharing nothing with the scan."""
    B, T, H, K, V = check_qkv(q, k, v)
    for name, gate in memory.gates.items():
        check_gate(name, gates.get(name), B, T, H, hi=gate.hi)
    b = check_mini_batch(mini_batch)
    check_offset(offset, b)
    check_params(params, H, K, V)
    memory.check_state(initial_state, params, B)
    dt = compute_dtype(q)
    scale = default_scale(scale, K, default=memory.default_scale(K))
    P = {n: x.to(dt) for n, x in params.items()}
    if initial_state is not None:
        state = memory.complete_state(initial_state, dt)
    else:
        state = memory.init_state(B, H, K, V, q.new_empty(0, dtype=dt), P)
    qh, kh, vh = to_heads_first(q, dt), to_heads_first(k, dt), to_heads_first(v, dt)
    g = memory.fill_gates({n: to_heads_first(x, dt) for n, x in gates.items() if x is not None}, kh[..., 0])
    if chunked:
        o, _, state = memory.scan(
            qh, kh, vh, g, initial=state, segment_starts=(), resets=(), positions=(), offset=offset, scale=scale,
            params=P, mini_batch=b,
        )
    else:
        outs = []
        for t in range(T):
            g_t = {n: x[:, :, t] for n, x in g.items()}
            state = memory.step(state, kh[:, :, t], vh[:, :, t], g_t, seg_pos=offset + t, params=P, mini_batch=b)
            outs.append(memory.read(state, qh[:, :, t], scale))
        o = torch.stack(outs, dim=2)
    final = {n: x.contiguous() for n, x in state.items()} if output_final_state else None
    return o.transpose(1, 2).to(q.dtype), final
