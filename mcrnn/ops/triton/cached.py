"""The weighted read of the cached memories for `grm` / linear `soup`, `residual` and `mean` (SPEC §2.3).

For token `t` of segment `s(t)` and the pool entries `i` visible to it (`vis_lo[i] <= s(t) < vis_hi[i]`):

    o_t = w_on,t · r_t + Σ_i w_ti · (scale · q_t)ᵀ S_i,      w_ti = exp(z_ti − L_t),  w_on,t = exp(z_on,t − L_t)

- `grm` / `soup`: `z_ti = <u_t, p_i> · score_scale`, `z_on,t = <u_t, p_on,t> · score_scale` and `L_t` their
  log-sum-exp over the visible caches and the online memory (the softmax γ);
- `mean`: every `z = 0` and `L_t = log(n_t + 1)` (`n_t` visible caches);
- `residual`: every `z = 0` and `L_t = 0`.

Like flash attention over caches instead of keys. The scores `Z = score_scale · pool_p uᵀ: [B, H, P, T]` (the
`T × N` numbers, float32) are one GEMM in torch, recomputed in the backward pass, not stored. Kernels:

- `_fwd`, per (64 tokens, 64 values, batch·head): pass 1 runs the pool for `L_t` (loads of `Z`, no reads),
  pass 2 adds `w_i · (x @ S_i)` for every cache visible to a token of the tile (final weights, no rescaling).
  Writes `o` and `L_t` (`[B, H, T]`); the `T × N × V` reads never exist.
- `_bwd_tokens`, per (64 tokens, batch·head), full K and V: `gs = do @ S_iᵀ` per visible cache gives
  `dq += w_i gs` and (grm) the score gradients `dZ_ti = w_ti (scale · q_t · gs_t − D_t)` (written, `T × N`
  float32, zeros where a tile sees no cache) and `dz_on`; `D_t = <do_t, o_t>` as in flash attention.
- `_bwd_caches`, per (cache, 64 values, batch·head): `dS_i = Σ_t scale · q_t (w_ti do_t)ᵀ` over the token range
  that sees cache `i` (contiguous: tokens are in segment order, so two `searchsorted` of `seg`); no atomics.

`du`, `dp_on` and `dpool_p` are GEMMs of `dZ` and `dz_on` in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcrnn.ops.triton._common import (
    INTERPRET,
    block,
    check_shape,
    empty_for,
    launch_options,
    low_precision_dot,
    store_dtype,
    unsupported_reason,
)
from mcrnn.ops.triton._jit import dot, operand

AGGREGATION_CODES = {"residual": 0, "mean": 1, "grm": 2, "soup": 2}
RESIDUAL, MEAN, GRM = 0, 1, 2


@triton.jit
def _tile_visible(vis_lo, vis_hi, i, s_min, s_max):
    lo = tl.load(vis_lo + i)
    hi = tl.load(vis_hi + i)
    return lo, hi, (lo <= s_max) & (hi > s_min)


@triton.jit
def _fwd(
    q, r, z_on, Z, pool_S, seg, vis_lo, vis_hi, o, L,
    T, P, K, V, scale,
    AGG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """One tile of BT tokens and BV values: o = w_on r + Σ_i w_i (x @ S_i), x = scale · q (scale in the weights)."""
    i_t = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    dt = q.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = t < T, kk < K, vv < V
    s = tl.load(seg + t, mask=m_t, other=-1)
    s_min = tl.min(tl.where(m_t, s, 2147483647), 0)
    s_max = tl.max(s, 0)
    x = tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_t[:, None] & m_k[None, :], other=0.0)
    x = operand(x, dt, LOW_DOT)

    # pass 1: the log-normaliser L_t over the visible caches and the online memory (scores only, no reads)
    if AGG == 2:
        zo = tl.load(z_on + i_bh * T + t, mask=m_t, other=0.0)
        run_max = zo
        run_sum = tl.full([BT], 1.0, dtype=tl.float32)
        for i in range(0, P):
            lo, hi, any_visible = _tile_visible(vis_lo, vis_hi, i, s_min, s_max)
            if any_visible:
                z = tl.load(Z + (i_bh * P + i) * T + t, mask=m_t, other=0.0)
                z = tl.where((lo <= s) & (s < hi), z, float("-inf"))
                new_max = tl.maximum(run_max, z)
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
                run_max = new_max
        lse = run_max + tl.log(run_sum)
    elif AGG == 1:
        zo = tl.zeros([BT], dtype=tl.float32)
        n_visible = tl.zeros([BT], dtype=tl.float32)
        for i in range(0, P):
            lo = tl.load(vis_lo + i)
            hi = tl.load(vis_hi + i)
            n_visible += ((lo <= s) & (s < hi)).to(tl.float32)
        lse = tl.log(n_visible + 1.0)
    else:
        zo = tl.zeros([BT], dtype=tl.float32)
        lse = tl.zeros([BT], dtype=tl.float32)

    # pass 2: the weighted reads, final weights known (no rescaling of the accumulator)
    m_tv = m_t[:, None] & m_v[None, :]
    acc = tl.load(r + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0).to(tl.float32)
    acc = acc * tl.exp(zo - lse)[:, None]
    for i in range(0, P):
        lo, hi, any_visible = _tile_visible(vis_lo, vis_hi, i, s_min, s_max)
        if any_visible:
            if AGG == 2:
                z = tl.load(Z + (i_bh * P + i) * T + t, mask=m_t, other=0.0)
            else:
                z = tl.zeros([BT], dtype=tl.float32)
            w = tl.where((lo <= s) & (s < hi), tl.exp(z - lse) * scale, 0.0)
            S = tl.load(pool_S + (i_bh * P + i) * K * V + (kk[:, None] * V + vv[None, :]),
                        mask=m_k[:, None] & m_v[None, :], other=0.0)
            acc += dot(x, operand(S, dt, LOW_DOT), LOW_DOT) * w[:, None]
    tl.store(o + i_bh * T * V + (t[:, None] * V + vv[None, :]), acc.to(o.dtype.element_ty), mask=m_tv)
    if i_v == 0:
        tl.store(L + i_bh * T + t, lse, mask=m_t)


@triton.jit
def _bwd_tokens(
    q, r, z_on, Z, pool_S, seg, vis_lo, vis_hi, L, D, do,
    dq, dr, dz_on, dZ,
    T, P, K, V, scale,
    AGG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """Per token tile, full K and V: dq = scale Σ_i w_i S_i do, dr = w_on do, and (grm) the score gradients."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    dt = q.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    m_t, m_k, m_v = t < T, kk < K, vv < V
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    s = tl.load(seg + t, mask=m_t, other=-1)
    s_min = tl.min(tl.where(m_t, s, 2147483647), 0)
    s_max = tl.max(s, 0)
    g = operand(tl.load(do + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0), dt, LOW_DOT)
    if AGG == 0:
        lse = tl.zeros([BT], dtype=tl.float32)
    else:
        lse = tl.load(L + i_bh * T + t, mask=m_t, other=0.0)
    if AGG == 2:
        x = operand(tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0), dt, LOW_DOT)
        delta = tl.load(D + i_bh * T + t, mask=m_t, other=0.0)
        zo = tl.load(z_on + i_bh * T + t, mask=m_t, other=0.0)
    else:
        zo = tl.zeros([BT], dtype=tl.float32)
    w_on = tl.exp(zo - lse)
    d_r = (g.to(tl.float32) * w_on[:, None]).to(dr.dtype.element_ty)
    tl.store(dr + i_bh * T * V + (t[:, None] * V + vv[None, :]), d_r, mask=m_tv)
    if AGG == 2:
        rr = tl.load(r + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0).to(tl.float32)
        tl.store(dz_on + i_bh * T + t, w_on * (tl.sum(rr * g.to(tl.float32), 1) - delta), mask=m_t)
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i in range(0, P):
        lo, hi, any_visible = _tile_visible(vis_lo, vis_hi, i, s_min, s_max)
        if any_visible:
            if AGG == 2:
                z = tl.load(Z + (i_bh * P + i) * T + t, mask=m_t, other=0.0)
            else:
                z = tl.zeros([BT], dtype=tl.float32)
            w = tl.where((lo <= s) & (s < hi), tl.exp(z - lse), 0.0)
            S = tl.load(pool_S + (i_bh * P + i) * K * V + (kk[:, None] * V + vv[None, :]),
                        mask=m_k[:, None] & m_v[None, :], other=0.0)
            gs = dot(g, tl.trans(operand(S, dt, LOW_DOT)), LOW_DOT)  # do @ S_iᵀ: [BT, BK]
            dq_acc += gs * w[:, None]
            if AGG == 2:
                dz = w * (tl.sum(x.to(tl.float32) * gs, 1) * scale - delta)
                tl.store(dZ + (i_bh * P + i) * T + t, dz, mask=m_t)
        elif AGG == 2:
            tl.store(dZ + (i_bh * P + i) * T + t, tl.zeros([BT], dtype=tl.float32), mask=m_t)
    tl.store(dq + i_bh * T * K + (t[:, None] * K + kk[None, :]), (dq_acc * scale).to(dq.dtype.element_ty), mask=m_tk)


@triton.jit
def _bwd_caches(
    q, Z, seg, vis_lo, vis_hi, tok_lo, tok_hi, L, do, dS,
    T, P, K, V, scale,
    AGG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """Per cache i and value block: dS_i = Σ_t x_t (w_ti do_t)ᵀ over the token range that sees cache i."""
    i = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    dt = q.dtype.element_ty
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_k, m_v = kk < K, vv < V
    lo = tl.load(vis_lo + i)
    hi = tl.load(vis_hi + i)
    t_start = tl.load(tok_lo + i)
    t_end = tl.load(tok_hi + i)
    dS_acc = tl.zeros([BK, BV], dtype=tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        m_t = t < t_end
        s = tl.load(seg + t, mask=m_t, other=-1)
        visible = (lo <= s) & (s < hi) & m_t
        x = tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_t[:, None] & m_k[None, :], other=0.0)
        g = tl.load(do + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_t[:, None] & m_v[None, :], other=0.0)
        if AGG == 0:
            lse = tl.zeros([BT], dtype=tl.float32)
        else:
            lse = tl.load(L + i_bh * T + t, mask=m_t, other=0.0)
        if AGG == 2:
            z = tl.load(Z + (i_bh * P + i) * T + t, mask=m_t, other=0.0)
        else:
            z = tl.zeros([BT], dtype=tl.float32)
        w = tl.where(visible, tl.exp(z - lse) * scale, 0.0)
        gw = operand(g.to(tl.float32) * w[:, None], dt, LOW_DOT)  # [BT, BV]: the weights on the smaller side
        dS_acc += dot(tl.trans(operand(x, dt, LOW_DOT)), gw, LOW_DOT)
    tl.store(dS + (i_bh * P + i) * K * V + (kk[:, None] * V + vv[None, :]), dS_acc.to(dS.dtype.element_ty),
             mask=m_k[:, None] & m_v[None, :])


def _blocks(K: int, V: int) -> dict:
    BK, BV_full = block(K), block(V)
    if INTERPRET:  # few, large programs: the interpreter's cost is per program and per op, not per element
        return dict(BK=BK, fwd_BT=32, fwd_BV=BV_full, tok_BT=32, cache_BT=32, cache_BV=BV_full, BV=BV_full)
    tok_BT = 64 if BK * BV_full <= 128 * 128 else (32 if BK * BV_full <= 128 * 256 else 16)
    return dict(BK=BK, fwd_BT=64, fwd_BV=min(BV_full, 64), tok_BT=tok_BT, cache_BT=64, cache_BV=min(BV_full, 64),
                BV=BV_full)


def _scores(u, p_on, pool_p, score_scale):
    """`Z: [B, H, P, T]` and `z_on: [B, H, T]`, float32 (one GEMM: `T × P` numbers, recomputed in backward)."""
    uf = u.float()
    Z = torch.matmul(pool_p.float(), uf.transpose(-1, -2)).mul_(score_scale)
    z_on = (uf * p_on.float()).sum(-1).mul_(score_scale)
    return Z, z_on


class _CachedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, scale, score_scale, agg):
        B, H, T, K = q.shape
        P, V = pool_S.shape[2], pool_S.shape[-1]
        bs = _blocks(K, V)
        low = low_precision_dot(q.dtype)
        # the states in the dot's dtype, once per call: bf16 tiles load straight into shared memory
        states = pool_S.to(q.dtype) if low else pool_S
        Z, z_on = _scores(u, p_on, pool_p, score_scale) if agg == GRM else (None, None)
        o = torch.empty(B, H, T, V, dtype=store_dtype(q.dtype), device=q.device)
        L = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        _fwd[(triton.cdiv(T, bs["fwd_BT"]), triton.cdiv(V, bs["fwd_BV"]), B * H)](
            q, r, L if z_on is None else z_on, L if Z is None else Z, states, seg, vis_lo, vis_hi, o, L,
            T, P, K, V, scale,
            AGG=agg, BT=bs["fwd_BT"], BK=bs["BK"], BV=bs["fwd_BV"], LOW_DOT=low, **launch_options("fwd"),
        )
        o = o.to(q.dtype)
        ctx.save_for_backward(q, u, r, p_on, pool_p, states, seg, vis_lo, vis_hi, o, L)
        ctx.scale, ctx.score_scale, ctx.agg, ctx.pool_dtype = scale, score_scale, agg, pool_S.dtype
        return o

    @staticmethod
    def backward(ctx, d_o):
        q, u, r, p_on, pool_p, states, seg, vis_lo, vis_hi, o, L = ctx.saved_tensors
        agg, scale, ss = ctx.agg, ctx.scale, ctx.score_scale
        grm = agg == GRM
        B, H, T, K = q.shape
        P, V = states.shape[2], states.shape[-1]
        bs = _blocks(K, V)
        d_o = d_o.contiguous()
        low = low_precision_dot(q.dtype)
        if grm:
            Z, z_on = _scores(u, p_on, pool_p, ss)
            # D_t = <do_t, o_t>: the softmax backward's Σ_j γ_j (do · read_j), online term included
            D = (d_o.float() * o.float()).sum(-1)
            dZ = torch.empty(B, H, P, T, dtype=torch.float32, device=q.device)
            dz_on = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        else:
            Z = z_on = D = dZ = dz_on = L  # unused by the kernels: placeholders
        dq, dr = empty_for(q), empty_for(r)
        _bwd_tokens[(triton.cdiv(T, bs["tok_BT"]), B * H)](
            q, r, z_on, Z, states, seg, vis_lo, vis_hi, L, D, d_o, dq, dr, dz_on, dZ, T, P, K, V, scale,
            AGG=agg, BT=bs["tok_BT"], BK=bs["BK"], BV=bs["BV"], LOW_DOT=low, **launch_options("bwd_tokens"),
        )
        dS = torch.empty(states.shape, dtype=store_dtype(ctx.pool_dtype), device=q.device)
        # the contiguous token range that sees each cache (tokens are in segment order)
        tok_lo = torch.searchsorted(seg, vis_lo).to(torch.int32)
        tok_hi = torch.searchsorted(seg, vis_hi).to(torch.int32)
        _bwd_caches[(P, triton.cdiv(V, bs["cache_BV"]), B * H)](
            q, Z, seg, vis_lo, vis_hi, tok_lo, tok_hi, L, d_o, dS, T, P, K, V, scale,
            AGG=agg, BT=bs["cache_BT"], BK=bs["BK"], BV=bs["cache_BV"], LOW_DOT=low, **launch_options("bwd_caches"),
        )
        du = dp_on = dp = None
        if grm:  # the scores' gradients: GEMMs of dZ [B, H, P, T] and dz_on [B, H, T]
            uf = u.float()
            du = (torch.matmul(dZ.transpose(-1, -2), pool_p.float()) + dz_on[..., None] * p_on.float()) * ss
            dp_on = (dz_on[..., None] * uf * ss).to(p_on.dtype)
            dp = (torch.matmul(dZ, uf) * ss).to(pool_p.dtype)
            du = du.to(u.dtype)
        return dq.to(q.dtype), du, dr.to(r.dtype), dp_on, dp, dS.to(ctx.pool_dtype), *([None] * 6)


def cached_read(
    q: torch.Tensor,
    u: torch.Tensor | None,
    r: torch.Tensor,
    p_on: torch.Tensor | None,
    pool_p: torch.Tensor | None,
    pool_S: torch.Tensor,
    seg: torch.Tensor,
    vis_lo: torch.Tensor,
    vis_hi: torch.Tensor,
    *,
    scale: float,
    score_scale: float | None = None,
    aggregation: str = "grm",
) -> torch.Tensor:
    """Aggregated read of the online memory and the visible caches of a linear memory (SPEC §2.3), fused.

    Args (heads-first):
        q: `[B, H, T, K]` queries (unscaled); u: `[B, H, T, Ks]` score queries (grm/soup; None: `u = q`).
        r: `[B, H, T, V]` the online memory's reads.
        p_on: `[B, H, T, Ks]` the online summaries (grm/soup); pool_p: `[B, H, P, Ks]` the caches' summaries.
        pool_S: `[B, H, P, K, V]` the cached states (any of float32/bf16/fp16).
        seg: `[T]` integer segment of every token, non-decreasing (shared by the batch).
        vis_lo, vis_hi: `[P]` integers: entry `i` is visible to the tokens of segments `vis_lo[i] <= s < vis_hi[i]`.
        scale: multiplies q before reading; score_scale: multiplies the scores (default `Ks ** -0.5`).
        aggregation: "grm" | "soup" (equal for a linear read) | "residual" | "mean".
    Returns:
        `o: [B, H, T, V]` in q's dtype. Differentiable w.r.t. q, u, r, p_on, pool_p, pool_S (u, p_on, pool_p
        only matter for grm/soup and may be None otherwise).
    """
    if aggregation not in AGGREGATION_CODES:
        raise ValueError(f"`aggregation` must be one of {sorted(AGGREGATION_CODES)} here, got {aggregation!r}")
    agg = AGGREGATION_CODES[aggregation]
    if q.dim() != 4:
        raise ValueError(f"`q` must be [B, H, T, K] (heads-first), got shape {list(q.shape)}")
    B, H, T, K = q.shape
    if pool_S.dim() != 5 or tuple(pool_S.shape[:2]) != (B, H) or pool_S.shape[3] != K:
        raise ValueError(f"`pool_S` must be [B, H, P, K, V] = [{B}, {H}, P, {K}, V], got {list(pool_S.shape)}")
    P, V = pool_S.shape[2], pool_S.shape[4]
    check_shape("r", r, (B, H, T, V))
    if agg == GRM:
        u = q if u is None else u
        KS = u.shape[-1]
        check_shape("u", u, (B, H, T, KS))
        check_shape("p_on", p_on, (B, H, T, KS), "grm/soup need the online summaries")
        check_shape("pool_p", pool_p, (B, H, P, KS), "grm/soup need the caches' summaries")
        score_scale = KS**-0.5 if score_scale is None else score_scale
    else:
        u = p_on = pool_p = None
    check_shape("seg", seg, (T,), "one segment index per token")
    check_shape("vis_lo", vis_lo, (P,), "one per pool entry")
    check_shape("vis_hi", vis_hi, (P,), "one per pool entry")
    reason = unsupported_reason(q, u, r, p_on, pool_p, pool_S, dims=(K, V))
    if reason:
        raise ValueError(f"cached_read cannot run the Triton kernels on these inputs: {reason}")
    if P == 0 or T == 0:  # nothing cached: every aggregation is the online read
        return r.to(q.dtype)
    seg, vis_lo, vis_hi = (x.to(device=q.device, dtype=torch.int32).contiguous() for x in (seg, vis_lo, vis_hi))
    if T > 1 and bool((seg[1:] < seg[:-1]).any()):
        raise ValueError("`seg` must be non-decreasing (tokens in segment order)")
    q, r, pool_S = q.contiguous(), r.contiguous(), pool_S.contiguous()
    if agg == GRM:
        u, p_on, pool_p = u.contiguous(), p_on.contiguous(), pool_p.contiguous()
    return _CachedRead.apply(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, float(scale),
                             float(score_scale or 1.0), agg)
