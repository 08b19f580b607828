"""Chunk-parallel sliding-window (window 2) linear attention, reduced to decayed linear attention.

With `X_t = S_t - c_t k_t v_tᵀ` the update `S_t = a_t S_{t-1} + b_t k_{t-1} v_{t-1}ᵀ + c_t k_t v_tᵀ` becomes
`X_t = a_t X_{t-1} + (a_t c_{t-1} + b_t) k_{t-1} v_{t-1}ᵀ`: linear attention over keys and values shifted by
one token, plus the diagonal term `c_t (q_t·k_t) v_t` in the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcrnn.ops.backend import resolve_backend
from mcrnn.ops.linear.chunk import _log_decay, check_state, linear_scan
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale, to_heads_first

SWLA_GATES = ("decay", "prev", "cur")


def swla_scan(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None,
    prev: torch.Tensor | None,
    cur: torch.Tensor | None,
    initial_state: dict[str, torch.Tensor] | None = None,
    resets: Sequence[int] = (),
    positions: Sequence[int] = (),
    backend: str = "torch",
    operand_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Heads-first SWLA (`q` already scaled, gates `[B, H, T]` or None meaning 1).

    `resets` restart the state from zero before that token, dropping the `b_t k_{t-1} v_{t-1}ᵀ` term (SPEC §1:
    the previous token belongs to another compressor). Returns `o`, snapshots `{"S", "k", "v"}` at `positions`
    (`[B, H, E, ...]`) and the final state `{"S": [B, H, K, V], "k": [B, H, K], "v": [B, H, V]}`.
    `backend` and `operand_dtype` pick the scan of the shifted linear attention (see
    :func:`mcrnn.ops.linear.chunk.linear_scan`).
    """
    B, H, T, K = k.shape
    V = v.shape[-1]
    one = k.new_ones(B, H, T)
    a = decay if decay is not None else one
    b = prev if prev is not None else one
    c = cur if cur is not None else one
    k_prev = initial_state["k"] if initial_state is not None else k.new_zeros(B, H, K)
    v_prev = initial_state["v"] if initial_state is not None else k.new_zeros(B, H, V)
    k_shift = torch.cat([k_prev.unsqueeze(2), k[:, :, :-1]], dim=2)
    v_shift = torch.cat([v_prev.unsqueeze(2), v[:, :, :-1]], dim=2)
    # At t = 0 the c_{-1} k_{-1} v_{-1}ᵀ part is already inside the incoming S, so only b_0 is left.
    coef = torch.cat([b[:, :, :1], a[:, :, 1:] * c[:, :, :-1] + b[:, :, 1:]], dim=2)
    if len(resets):
        keep = k.new_ones(T)
        keep[list(resets)] = 0.0
        coef = coef * keep
    log_a = _log_decay(decay) if decay is not None else None
    s0 = initial_state["S"] if initial_state is not None else None
    o, x_snap, x_final = linear_scan(
        q, k_shift * coef.unsqueeze(-1), v_shift, log_a, resets=resets, initial_state=s0, positions=positions,
        backend=backend, operand_dtype=operand_dtype,
    )
    if o is not None:
        o = o + ((q * k).sum(-1) * c).unsqueeze(-1) * v

    def full_state(x: torch.Tensor, idx: torch.Tensor | int) -> dict[str, torch.Tensor]:
        kk, vv, cc = k[:, :, idx], v[:, :, idx], c[:, :, idx]
        return {"S": x + (cc.unsqueeze(-1) * kk).unsqueeze(-1) * vv.unsqueeze(-2), "k": kk, "v": vv}

    snaps = None
    if len(positions):
        snaps = full_state(x_snap, torch.as_tensor(list(positions), device=k.device) - 1)
    return o, snaps, full_state(x_final, T - 1)


def chunk_swla(
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
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Sliding-window linear attention (window 2), chunk-parallel.

    `S_t = a_t S_{t-1} + b_t k_{t-1} v_{t-1}ᵀ + c_t k_t v_tᵀ`, `o_t = scale · q_tᵀ S_t`.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        decay, prev, cur: gates `a_t, b_t, c_t` of shape `[B, T, H]` in [0, 1] (None: 1).
        scale: multiplies q; default `K ** -0.5`.
        initial_state: `{"S": [B, H, K, V], "k": [B, H, K], "v": [B, H, V]}` (the previous token's key/value).
        backend: "auto" | "torch" | "triton" | None (the environment's `MCRNN_BACKEND`, else "auto"): the
            Triton scan (:mod:`mcrnn.ops.backend`) or PyTorch.
    Returns:
        `o: [B, T, H, V]` and, if `output_final_state`, the final state dict (float32 / float64).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    for name, g in (("decay", decay), ("prev", prev), ("cur", cur)):
        check_gate(name, g, B, T, H)
    check_swla_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    gates = [to_heads_first(g, dt) if g is not None else None for g in (decay, prev, cur)]
    s0 = {n: x.to(dt) for n, x in initial_state.items()} if initial_state is not None else None
    o, _, final = swla_scan(
        to_heads_first(q, dt) * scale, to_heads_first(k, dt), to_heads_first(v, dt), *gates, initial_state=s0,
        backend=resolve_backend(backend),
    )
    return o.transpose(1, 2).to(q.dtype), (final if output_final_state else None)


def check_swla_state(state: dict | None, B: int, H: int, K: int, V: int) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or set(state) != {"S", "k", "v"}:
        raise ValueError("`initial_state` for swla must be a dict with keys 'S', 'k', 'v'")
    check_state(state["S"], B, H, K, V, name="initial_state['S']")
    for name, d in (("k", K), ("v", V)):
        if tuple(state[name].shape) != (B, H, d):
            raise ValueError(
                f"`initial_state['{name}']` must have shape [{B}, {H}, {d}], got {tuple(state[name].shape)}"
            )
