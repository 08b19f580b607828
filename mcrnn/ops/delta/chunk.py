"""Chunk-parallel (gated) delta rule: the WY / UT transform inside a chunk, a scan over chunks.

`S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ` is decayed linear attention `S_t = a_t S_{t-1} + k_t u_tᵀ`
with the values replaced by `u_t = β_t (v_t − a_t S_{t-1}ᵀ k_t)`. Inside a chunk entering with state `S₀`,
with `γ_t` the product of the decays up to `t` (inclusive) inside the chunk, unrolling `a_t S_{t-1}` gives

    u_t + β_t Σ_{j<t} (γ_t / γ_j)(k_tᵀ k_j) u_j = β_t v_t − β_t γ_t S₀ᵀ k_t,

a unit-lower-triangular system `(I + A) U = diag(β) V − diag(β γ) K S₀`. Its solution is affine in `S₀`:
`U = W_v − W_k S₀` (one triangular solve per chunk for both right-hand sides). Then

    o_t = γ_t q_tᵀ S₀ + Σ_{j≤t} (γ_t / γ_j)(q_tᵀ k_j) u_j,
    S_end = γ_c S₀ + Σ_j (γ_c / γ_j) k_j u_jᵀ = M S₀ + Δ,   M = γ_c I − K̃ᵀ W_k,   Δ = K̃ᵀ W_v,

with `K̃_j = (γ_c / γ_j) k_j`. Everything except the `[K, K] × [K, V]` recurrence over chunks is batched over
all chunks. Decay ratios are `exp` of differences of cumulative log decays (never `exp(g) / exp(g)`), so a
decay of 0 (floored log, see `mcrnn.ops.linear.chunk._log_decay`) cannot overflow or give NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mcrnn.ops.delta.naive import check_beta
from mcrnn.ops.linear.chunk import check_state
from mcrnn.ops.utils import check_qkv, compute_dtype, default_scale, to_heads_first

CHUNK_SIZE = 64


class _MatrixScan(torch.autograd.Function):
    """`S_{i+1} = M_i S_i + Δ_i` over chunks (`M: [B, H, n, K, K]`, `Δ: [B, H, n, K, V]`); returns every `S_i`
    (`[B, H, n, K, V]`, the state entering chunk `i`) and `S_n`.

    A hand-written backward: autograd over the Python loop would keep one graph node per chunk and zero-fill a
    full `[B, H, n, ...]` gradient for every sliced chunk; here `dM` is one batched GEMM after the loop. The loop
    runs chunk-major (`[n, B·H, ...]`, contiguous) so that each step is one `baddbmm` without copies."""

    @staticmethod
    def forward(ctx, carry: torch.Tensor, delta: torch.Tensor, s0: torch.Tensor):
        B, H, n, K, V = delta.shape
        carry_n = carry.reshape(B * H, n, K, K).transpose(0, 1).contiguous()
        delta_n = delta.reshape(B * H, n, K, V).transpose(0, 1).contiguous()
        starts = delta.new_empty(n, B * H, K, V)
        state = s0.reshape(B * H, K, V)
        for i in range(n):
            starts[i] = state
            state = torch.baddbmm(delta_n[i], carry_n[i], state)
        ctx.save_for_backward(carry_n, starts)
        return starts.transpose(0, 1).reshape(B, H, n, K, V), state.reshape(B, H, K, V)

    @staticmethod
    def backward(ctx, d_starts: torch.Tensor | None, d_final: torch.Tensor | None):
        carry_n, starts = ctx.saved_tensors
        n, BH, K, V = starts.shape
        B, H = d_final.shape[:2] if d_final is not None else d_starts.shape[:2]
        d_delta = torch.empty_like(starts)
        d_state = d_final.reshape(BH, K, V) if d_final is not None else starts.new_zeros(BH, K, V)
        if d_starts is not None:
            d_starts = d_starts.reshape(BH, n, K, V).transpose(0, 1).contiguous()
        carry_t = carry_n.transpose(-1, -2)
        for i in range(n - 1, -1, -1):
            d_delta[i] = d_state
            if d_starts is not None:
                d_state = torch.baddbmm(d_starts[i], carry_t[i], d_state)
            else:
                d_state = torch.bmm(carry_t[i], d_state)
        d_carry = None
        if ctx.needs_input_grad[0]:
            d_carry = (d_delta @ starts.transpose(-1, -2)).transpose(0, 1).reshape(B, H, n, K, K)
        return d_carry, d_delta.transpose(0, 1).reshape(B, H, n, K, V), d_state.reshape(B, H, K, V)


class _UnitLowerSolve(torch.autograd.Function):
    """`W = (I + A)⁻¹ R` for strictly lower-triangular `A: [*, c, c]` (its diagonal and upper part are ignored).

    The inverse is formed once (one triangular solve against the identity, `c` columns) and applied with a GEMM;
    the backward is two more GEMMs. Autograd through `solve_triangular` would instead solve twice with all
    `V + K` columns, and a batched triangular solve is several times slower per flop than a GEMM on CPU."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, R: torch.Tensor):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        W = inverse @ R
        ctx.save_for_backward(inverse, W)
        return W

    @staticmethod
    def backward(ctx, d_W: torch.Tensor):
        inverse, W = ctx.saved_tensors
        d_R = inverse.transpose(-1, -2) @ d_W
        d_A = -(d_R @ W.transpose(-1, -2)).tril(-1)
        return d_A, d_R


def delta_scan(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    resets: Sequence[int] = (),
    initial_state: torch.Tensor | None = None,
    positions: Sequence[int] = (),
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The recurrence `S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`, `o_t = q_tᵀ S_t`, chunk by chunk.

    The contract of :func:`mcrnn.ops.linear.chunk.linear_scan`, plus the gate `beta`. Heads-first layout,
    already in the compute dtype and already scaled: `q, k: [B, H, T, K]`, `v: [B, H, T, V]`,
    `beta: [B, H, T]`, `log_decay: [B, H, T]` (None: no decay, DeltaNet), `initial_state: [B, H, K, V]`
    (None: zeros).
    `resets`: token positions at which the state restarts from zero *before* that token's update (the
    initial state is only the state before token 0, unless 0 is a reset).
    `positions`: exclusive ends `e` in `1..T` whose state (after token `e - 1`) is returned.

    Returns `o: [B, H, T, V]` (None when `q` is None), the snapshots `[B, H, len(positions), K, V]` (None when
    empty) and the final state `[B, H, K, V]`.
    """
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

    # Padded tokens have k = v = β = 0 and decay 1: they change neither the state nor the real outputs.
    kc, vc = chunks(k), chunks(v)
    bc = F.pad(beta, (0, pad)).reshape(B, H, n, c, 1)
    g = F.pad(log_decay, (0, pad)).reshape(B, H, n, c).cumsum(-1) if log_decay is not None else None

    reset_flags = torch.zeros(n * c, dtype=torch.long, device=dev)
    if len(resets):
        reset_flags[torch.as_tensor(list(resets), dtype=torch.long, device=dev)] = 1
    rc = reset_flags.reshape(n, c).cumsum(-1)  # resets seen so far inside the chunk: tokens with equal rc interact
    same = rc[:, :, None] == rc[:, None, :]  # [n, c, c]
    causal = (torch.ones(c, c, dtype=torch.bool, device=dev).tril() & same).expand(B, H, n, c, c)

    def ratio(g_to: torch.Tensor | None, g_from: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
        """`γ_to / γ_from = exp(g_to − g_from)` where `keep`, else 0 (masked before the exp: no overflow)."""
        if g_to is None:
            return keep.to(dt)
        return torch.exp((g_to - g_from).masked_fill(~keep, float("-inf")))

    from_start = (rc == 0).expand(B, H, n, c)  # tokens that still see the state entering the chunk
    gamma = from_start.to(dt) if g is None else torch.exp(g.masked_fill(~from_start, float("-inf")))  # [B, H, n, c]
    # γ_t / γ_j for j ≤ t: the intra-chunk decays of both the UT system and the output
    decays = ratio(g.unsqueeze(-1) if g is not None else None, g.unsqueeze(-2) if g is not None else None, causal)

    # The UT transform: one unit-lower-triangular solve for both right-hand sides [β v | β γ k]. Only the
    # strictly lower part of A is read (the diagonal is taken as 1 and gets no gradient).
    A = ((kc * bc) @ kc.transpose(-1, -2)) * decays
    rhs = torch.cat([vc, kc * gamma.unsqueeze(-1)], dim=-1) * bc
    W = _UnitLowerSolve.apply(A, rhs)  # [W_v | W_k]: [B, H, n, c, V + K]

    end_keep = (rc == rc[:, -1:]).expand(B, H, n, c)
    k_end = kc * ratio(g[..., -1:] if g is not None else None, g, end_keep).unsqueeze(-1)  # K̃
    delta, k_end_W_k = (k_end.transpose(-1, -2) @ W).split([V, K], dim=-1)
    eye = torch.eye(K, dtype=dt, device=dev)
    carry = gamma[..., -1, None, None] * eye - k_end_W_k  # [B, H, n, K, K]
    # contiguous halves: CPU bmm falls back to one GEMM (and one copy) per matrix on strided views
    W_v, W_k = (x.contiguous() for x in W.split([V, K], dim=-1))

    state = initial_state if initial_state is not None else k.new_zeros(B, H, K, V)
    start_states, state = _MatrixScan.apply(carry, delta, state)

    if q is None and not len(positions):
        return None, None, state
    U = W_v - W_k @ start_states  # the effective values u_t, [B, H, n, c, V]

    o = None
    if q is not None:
        qc = chunks(q)
        intra = (qc @ kc.transpose(-1, -2)) * decays
        o = intra @ U + (qc * gamma.unsqueeze(-1)) @ start_states
        o = o.reshape(B, H, n * c, V)[:, :, :T]

    snapshots = None
    if len(positions):
        p = torch.as_tensor(list(positions), dtype=torch.long, device=dev) - 1
        ci, off = p // c, p % c
        ar = torch.arange(c, device=dev)
        keep = ((ar[None, :] <= off[:, None]) & (rc[ci] == rc[ci, off][:, None])).expand(B, H, -1, c)  # [B,H,E,c]
        if g is not None:
            ge = g[:, :, ci]  # [B, H, E, c]
            g_at = ge.gather(-1, off.view(1, 1, -1, 1).expand(B, H, -1, 1))
            w = ratio(g_at, ge, keep)
        else:
            w = keep.to(dt)
        gamma_at = gamma[:, :, ci].gather(-1, off.view(1, 1, -1, 1).expand(B, H, -1, 1))  # [B, H, E, 1]
        part = (kc[:, :, ci] * w.unsqueeze(-1)).transpose(-1, -2) @ U[:, :, ci]
        snapshots = gamma_at.unsqueeze(-1) * start_states[:, :, ci] + part
    return o, snapshots, state


def chunk_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet, chunk-parallel: `S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`, `o_t = scale · q_tᵀ S_t`.

    Args:
        q, k: `[B, T, H, K]` (the layer ℓ2-normalises them); v: `[B, T, H, V]`.
        beta: `[B, T, H]` writing strength in [0, 1] (up to 2 for negative eigenvalues).
        scale: multiplies q; default `K ** -0.5`.
        initial_state: `[B, H, K, V]`.
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the final state `[B, H, K, V]` (float32,
        or float64 for float64 inputs).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    check_beta(beta, B, T, H)
    check_state(initial_state, B, H, K, V)
    dt = compute_dtype(q)
    scale = default_scale(scale, K)
    s0 = initial_state.to(dt) if initial_state is not None else None
    o, _, final = delta_scan(
        to_heads_first(q, dt) * scale, to_heads_first(k, dt), to_heads_first(v, dt), to_heads_first(beta, dt),
        initial_state=s0,
    )
    return o.transpose(1, 2).to(q.dtype), (final if output_final_state else None)
