"""Chunk-parallel linear attention with scalar decay, segment resets and state snapshots."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mcrnn.ops.backend import resolve_backend, triton_kernels
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale, to_heads_first

CHUNK_SIZE = 64


def _log_decay(decay: torch.Tensor) -> torch.Tensor:
    # A gate of exactly 0 would give log 0 = -inf and then -inf - (-inf) = NaN inside a chunk; a floor of
    # -60 per token is exp(-60) ~ 1e-26, i.e. zero for every dtype we compute in.
    return torch.log(decay.clamp_min(1e-26)).clamp_min(-60.0)


class _ChunkScan(torch.autograd.Function):
    """`S_{i+1} = c_i S_i + Δ_i` over chunks; returns every `S_i` (`[B, H, n, K, V]`) and `S_n`.

    A hand-written backward: autograd over a Python loop of per-chunk slices would zero-fill a full
    `[B, H, n, K, V]` gradient for every chunk."""

    @staticmethod
    def forward(ctx, carry: torch.Tensor, delta: torch.Tensor, s0: torch.Tensor):
        n = delta.shape[2]
        starts = delta.new_empty(delta.shape)
        state = s0
        for i in range(n):
            starts[:, :, i] = state
            state = torch.addcmul(delta[:, :, i], carry[:, :, i, None, None], state)
        ctx.save_for_backward(carry, starts)
        return starts, state

    @staticmethod
    def backward(ctx, d_starts: torch.Tensor | None, d_final: torch.Tensor | None):
        carry, starts = ctx.saved_tensors
        n = starts.shape[2]
        d_delta = torch.empty_like(starts)
        d_carry = torch.empty_like(carry)
        d_state = d_final if d_final is not None else torch.zeros_like(starts[:, :, 0])
        for i in range(n - 1, -1, -1):
            d_delta[:, :, i] = d_state
            d_carry[:, :, i] = (d_state * starts[:, :, i]).sum((-1, -2))
            d_state = carry[:, :, i, None, None] * d_state
            if d_starts is not None:
                d_state = d_state + d_starts[:, :, i]
        return d_carry, d_delta, d_state


def linear_scan(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    resets: Sequence[int] = (),
    initial_state: torch.Tensor | None = None,
    positions: Sequence[int] = (),
    chunk_size: int = CHUNK_SIZE,
    backend: str = "torch",
    operand_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The recurrence `S_t = a_t S_{t-1} + k_t v_tᵀ`, `o_t = q_tᵀ S_t`, computed chunk by chunk.

    Heads-first layout, already in the compute dtype and already scaled:
    `q, k: [B, H, T, K]`, `v: [B, H, T, V]`, `log_decay: [B, H, T]` (None: no decay),
    `initial_state: [B, H, K, V]` (None: zeros).
    `resets`: token positions at which the state restarts from zero *before* that token's update.
    `positions`: exclusive ends `e` in `1..T` whose state (after token `e - 1`) is returned.

    `backend`: "torch" (this function's PyTorch code) | "auto" | "triton" (:func:`mcrnn.ops.triton.chunk_scan`
    where it runs and covers the call, see :mod:`mcrnn.ops.backend`; it picks its own chunk size and returns
    the states in float32). `operand_dtype` (bf16/fp16, kernels only): q, k, v enter the kernels' dots in that
    precision, accumulation and states stay float32, `o` comes back in k's dtype.

    Returns `o: [B, H, T, V]` (None when `q` is None), the snapshots `[B, H, len(positions), K, V]`
    (None when empty) and the final state `[B, H, K, V]`.
    The only Python loop is over chunks (`T / chunk_size` steps of a `[K, V]` update).
    """
    if backend != "torch":
        kernels = triton_kernels(resolve_backend(backend), k)
        if kernels is not None and kernels.scan_unsupported_reason(q, k, v, log_decay, initial_state) is None:
            if operand_dtype is None:
                return kernels.chunk_scan(q, k, v, log_decay, resets, initial_state, positions)
            # the kernels' dots in the call's precision (bf16/fp16), states and accumulation in float32
            lo = (x.to(operand_dtype) if x is not None else None for x in (q, k, v))
            o, snaps, final = kernels.chunk_scan(*lo, log_decay, resets, initial_state, positions)
            return (o.to(k.dtype) if o is not None else None), snaps, final
    B, H, T, K = k.shape
    V = v.shape[-1]
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    dev, dt = k.device, k.dtype

    def chunks(x: torch.Tensor) -> torch.Tensor:
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, n, c, x.shape[-1])

    kc, vc = chunks(k), chunks(v)
    if log_decay is not None:
        g = F.pad(log_decay, (0, pad)).reshape(B, H, n, c).cumsum(-1)
    else:
        g = None
    reset_flags = torch.zeros(n * c, dtype=torch.long, device=dev)
    if len(resets):
        reset_flags[torch.as_tensor(list(resets), dtype=torch.long, device=dev)] = 1
    rc = reset_flags.reshape(n, c).cumsum(-1)  # resets seen so far inside the chunk
    has_resets = len(resets) > 0
    causal = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    mask = causal & (rc[:, :, None] == rc[:, None, :]) if has_resets else causal.expand(n, c, c)

    def decay_between(g_to: torch.Tensor, g_from: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`exp(g_to - g_from)` where `keep`, else 0 (masked before the exp: no overflow, no NaN)."""
        if g_to is None:
            return keep.to(dt)
        return torch.exp((g_to - g_from).masked_fill(~keep, float("-inf")))

    # Contribution of each chunk to the state at its end, and how the incoming state is carried through.
    end_keep = rc == rc[:, -1:]  # [n, c]
    w_end = decay_between(g[..., -1:] if g is not None else None, g, end_keep.expand(B, H, n, c))
    delta = (kc * w_end.unsqueeze(-1)).transpose(-1, -2) @ vc  # [B, H, n, K, V]
    carry = rc[:, -1] == 0  # [n]
    carry_w = carry.to(dt).expand(B, H, n) if g is None else torch.exp(g[..., -1]) * carry.to(dt)

    state = initial_state if initial_state is not None else k.new_zeros(B, H, K, V)
    start_states, state = _ChunkScan.apply(carry_w, delta, state)  # start_states: the state entering each chunk

    o = None
    if q is not None:
        qc = chunks(q)
        intra = decay_between(
            g.unsqueeze(-1) if g is not None else None,
            g.unsqueeze(-2) if g is not None else None,
            mask.expand(B, H, n, c, c),
        )
        o = ((qc @ kc.transpose(-1, -2)) * intra) @ vc
        in_keep = (rc == 0).to(dt)
        q_in = qc * (in_keep if g is None else torch.exp(g) * in_keep).unsqueeze(-1)
        o = (o + q_in @ start_states).reshape(B, H, n * c, V)[:, :, :T]

    snapshots = None
    if len(positions):
        p = torch.as_tensor(list(positions), dtype=torch.long, device=dev) - 1
        ci, off = p // c, p % c
        ar = torch.arange(c, device=dev)
        keep = (ar[None, :] <= off[:, None]) & (rc[ci] == rc[ci, off][:, None])  # [E, c]
        # index_select, not advanced indexing: its backward is an index_add, not a sorting index_put
        if g is not None:
            ge = g.index_select(2, ci)  # [B, H, E, c]
            g_at = ge.gather(-1, off.view(1, 1, -1, 1).expand(B, H, -1, 1))
            w = decay_between(g_at, ge, keep.expand_as(ge))
            carry_e = torch.exp(g_at[..., 0]) * (rc[ci, off] == 0).to(dt)
        else:
            w = keep.to(dt).expand(B, H, -1, c)
            carry_e = (rc[ci, off] == 0).to(dt).expand(B, H, -1)
        part = (kc.index_select(2, ci) * w.unsqueeze(-1)).transpose(-1, -2) @ vc.index_select(2, ci)
        snapshots = carry_e[..., None, None] * start_states.index_select(2, ci) + part
    return o, snapshots, state


def chunk_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Decayed) linear attention, chunk-parallel: `S_t = a_t S_{t-1} + k_t v_tᵀ`, `o_t = scale · q_tᵀ S_t`.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        decay: `[B, T, H]` gate `a_t` in [0, 1] (None: 1, plain linear attention).
        scale: multiplies q; default `K ** -0.5`.
        initial_state: `[B, H, K, V]`.
        backend: "auto" | "torch" | "triton" | None (the environment's `MCRNN_BACKEND`, else "auto"): the
            Triton scan (:mod:`mcrnn.ops.backend`) or PyTorch.
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the final state `[B, H, K, V]` (float32,
        or float64 for float64 inputs).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    check_gate("decay", decay, B, T, H)
    check_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    log_a = _log_decay(to_heads_first(decay, dt)) if decay is not None else None
    s0 = initial_state.to(dt) if initial_state is not None else None
    backend = resolve_backend(backend)
    o, _, final = linear_scan(
        to_heads_first(q, dt) * scale, to_heads_first(k, dt), to_heads_first(v, dt), log_a, initial_state=s0,
        backend=backend,
    )
    return o.transpose(1, 2).to(q.dtype), (final if output_final_state else None)


def check_state(state: torch.Tensor | None, B: int, H: int, K: int, V: int, name: str = "initial_state") -> None:
    if state is None:
        return
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, H, K, V):
        shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"`{name}` must be a tensor of shape [B, H, K, V] = [{B}, {H}, {K}, {V}], got {shape}")
