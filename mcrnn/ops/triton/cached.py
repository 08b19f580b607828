"""The weighted read of the cached memories for `grm` / linear `soup`, `residual` and `mean` (SPEC §2.3).

For token `t` of segment `s(t)` and the pool entries `i` visible to it (`vis_lo[i] <= s(t) < vis_hi[i]`):

    o_t = w_on,t · r_t + Σ_i w_ti · (scale · q_t)ᵀ S_i,      w_ti = exp(z_ti − L_t),  w_on,t = exp(z_on,t − L_t)

- `grm` / `soup`: `z_ti = <u_t, p_i> · score_scale`, `z_on,t = <u_t, p_on,t> · score_scale` and `L_t` their
  log-sum-exp over the visible caches and the online memory (the softmax γ);
- `mean`: every `z = 0` and `L_t = log(n_t + 1)` (`n_t` visible caches);
- `residual`: every `z = 0` and `L_t = 0`.

Like flash attention over caches instead of keys: a program holds a tile of tokens `[BT, K]` and runs over the
pool, a `[BT, K] x [K, BV]` product per visible cache; the `T × N × V` reads never exist. The forward pass
stores `o` and `L_t` (`[B, H, T]`) and recomputes nothing; the backward recomputes the weights `w_ti` from
`L_t` in two kernels:

- per token tile (`_bwd_tokens`): `dq`, `du`, `dr`, `dp_on` from `do @ S_iᵀ` per visible cache, and (grm) the
  score gradients `dz_ti = γ_ti (x_tᵀ S_i do_t − D_t)`, stored `[B, H, P, T]` float32 (the only `T × N`
  tensor: storing it saves the per-cache kernel a second `x @ S_i` product per token);
- per cache (`_bwd_caches`): `dS_i = Σ_t w_ti x_t do_tᵀ` and `dp_i = Σ_t dz_ti u_t · score_scale`, over the
  contiguous token range that sees cache `i` (tokens are in segment order, so that range is two binary
  searches of `seg`).

`D_t = <do_t, o_t>` is the softmax backward's `Σ_j γ_tj (do_t · read_tj)` over the caches and the online
memory, as in flash attention.
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

AGGREGATION_CODES = {"residual": 0, "mean": 1, "grm": 2, "soup": 2}
RESIDUAL, MEAN, GRM = 0, 1, 2


@triton.jit
def _tile_visible(vis_lo, vis_hi, i, s_min, s_max):
    lo = tl.load(vis_lo + i)
    hi = tl.load(vis_hi + i)
    return lo, hi, (lo <= s_max) & (hi > s_min)


@triton.jit
def _fwd(
    q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, o, L,
    T, P, K, V, KS, scale, score_scale,
    AGG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
    LOW_DOT: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    ks = tl.arange(0, BKS)
    m_t, m_k, m_v, m_ks = t < T, kk < K, vv < V, ks < KS
    s = tl.load(seg + t, mask=m_t, other=-1)
    s_min = tl.min(tl.where(m_t, s, 2147483647), 0)
    s_max = tl.max(s, 0)
    x = tl.load(q + (i_bh * T + t[:, None]) * K + kk[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    x = x.to(tl.float32) * scale

    # pass 1: the log-normaliser L_t over the visible caches and the online memory (vectors only, no reads)
    z_on = tl.zeros([BT], dtype=tl.float32)
    if AGG == 2:
        m_tk = m_t[:, None] & m_ks[None, :]
        uu = tl.load(u + (i_bh * T + t[:, None]) * KS + ks[None, :], mask=m_tk, other=0.0).to(tl.float32)
        pon = tl.load(p_on + (i_bh * T + t[:, None]) * KS + ks[None, :], mask=m_tk, other=0.0).to(tl.float32)
        z_on = tl.sum(uu * pon, 1) * score_scale
        run_max = z_on
        run_sum = tl.full([BT], 1.0, dtype=tl.float32)
        for i in range(0, P):
            lo, hi, any_visible = _tile_visible(vis_lo, vis_hi, i, s_min, s_max)
            if any_visible:
                p_i = tl.load(pool_p + (i_bh * P + i) * KS + ks, mask=m_ks, other=0.0).to(tl.float32)
                z = tl.sum(uu * p_i[None, :], 1) * score_scale
                z = tl.where((lo <= s) & (s < hi), z, float("-inf"))
                new_max = tl.maximum(run_max, z)
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
                run_max = new_max
        lse = run_max + tl.log(run_sum)
    elif AGG == 1:
        n_visible = tl.zeros([BT], dtype=tl.float32)
        for i in range(0, P):
            lo = tl.load(vis_lo + i)
            hi = tl.load(vis_hi + i)
            n_visible += ((lo <= s) & (s < hi)).to(tl.float32)
        lse = tl.log(n_visible + 1.0)
    else:
        lse = tl.zeros([BT], dtype=tl.float32)

    # pass 2: the weighted reads, final weights known (no rescaling of the accumulator)
    m_tv = m_t[:, None] & m_v[None, :]
    acc = tl.load(r + (i_bh * T + t[:, None]) * V + vv[None, :], mask=m_tv, other=0.0).to(tl.float32)
    acc = acc * tl.exp(z_on - lse)[:, None]
    for i in range(0, P):
        lo, hi, any_visible = _tile_visible(vis_lo, vis_hi, i, s_min, s_max)
        if any_visible:
            if AGG == 2:
                p_i = tl.load(pool_p + (i_bh * P + i) * KS + ks, mask=m_ks, other=0.0).to(tl.float32)
                z = tl.sum(uu * p_i[None, :], 1) * score_scale
            else:
                z = tl.zeros([BT], dtype=tl.float32)
            w = tl.where((lo <= s) & (s < hi), tl.exp(z - lse), 0.0)
            S = tl.load(pool_S + ((i_bh * P + i) * K + kk[:, None]) * V + vv[None, :],
                        mask=m_k[:, None] & m_v[None, :], other=0.0)
            xw = x * w[:, None]
            if LOW_DOT:
                acc = tl.dot(xw.to(q.dtype.element_ty), S.to(q.dtype.element_ty), acc)
            else:
                acc = tl.dot(xw, S.to(tl.float32), acc, input_precision="ieee")
    tl.store(o + (i_bh * T + t[:, None]) * V + vv[None, :], acc.to(o.dtype.element_ty), mask=m_tv)
    if i_v == 0:
        tl.store(L + i_bh * T + t, lse, mask=m_t)


@triton.jit
def _bwd_tokens(
    q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, L, D, do,
    dq, du, dr, dp_on, dz_buf,
    T, P, K, V, KS, scale, score_scale,
    AGG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
    LOW_DOT: tl.constexpr,
):
    """Per token tile, full K and V: dq = scale Σ_i w_i S_i do, and for grm du, dp_on and the score gradients
    dz_ti = γ_ti (a_ti − D_t), `a_ti = x_tᵀ S_i do_t`, stored to `dz_buf: [B, H, P, T]` for the tiles that see
    cache i (the per-cache kernel reduces them to dp_i: no second `x @ S_i` product there)."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    ks = tl.arange(0, BKS)
    m_t, m_k, m_v, m_ks = t < T, kk < K, vv < V, ks < KS
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    s = tl.load(seg + t, mask=m_t, other=-1)
    s_min = tl.min(tl.where(m_t, s, 2147483647), 0)
    s_max = tl.max(s, 0)
    x = tl.load(q + (i_bh * T + t[:, None]) * K + kk[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
    g = tl.load(do + (i_bh * T + t[:, None]) * V + vv[None, :], mask=m_tv, other=0.0).to(tl.float32)
    if AGG == 0:
        lse = tl.zeros([BT], dtype=tl.float32)
    else:
        lse = tl.load(L + i_bh * T + t, mask=m_t, other=0.0)
    z_on = tl.zeros([BT], dtype=tl.float32)
    if AGG == 2:
        m_tks = m_t[:, None] & m_ks[None, :]
        uu = tl.load(u + (i_bh * T + t[:, None]) * KS + ks[None, :], mask=m_tks, other=0.0).to(tl.float32)
        pon = tl.load(p_on + (i_bh * T + t[:, None]) * KS + ks[None, :], mask=m_tks, other=0.0).to(tl.float32)
        delta = tl.load(D + i_bh * T + t, mask=m_t, other=0.0)
        z_on = tl.sum(uu * pon, 1) * score_scale
    w_on = tl.exp(z_on - lse)
    tl.store(dr + (i_bh * T + t[:, None]) * V + vv[None, :], (g * w_on[:, None]).to(dr.dtype.element_ty), mask=m_tv)
    if AGG == 2:
        rr = tl.load(r + (i_bh * T + t[:, None]) * V + vv[None, :], mask=m_tv, other=0.0).to(tl.float32)
        dz_on = w_on * (tl.sum(rr * g, 1) - delta)
        du_acc = dz_on[:, None] * pon
        tl.store(dp_on + (i_bh * T + t[:, None]) * KS + ks[None, :],
                 (uu * (dz_on * score_scale)[:, None]).to(dp_on.dtype.element_ty), mask=m_tks)
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i in range(0, P):
        lo, hi, any_visible = _tile_visible(vis_lo, vis_hi, i, s_min, s_max)
        if any_visible:
            if AGG == 2:
                p_i = tl.load(pool_p + (i_bh * P + i) * KS + ks, mask=m_ks, other=0.0).to(tl.float32)
                z = tl.sum(uu * p_i[None, :], 1) * score_scale
            else:
                z = tl.zeros([BT], dtype=tl.float32)
            w = tl.where((lo <= s) & (s < hi), tl.exp(z - lse), 0.0)
            S = tl.load(pool_S + ((i_bh * P + i) * K + kk[:, None]) * V + vv[None, :],
                        mask=m_k[:, None] & m_v[None, :], other=0.0)
            if LOW_DOT:
                gs = tl.dot(g.to(q.dtype.element_ty), tl.trans(S.to(q.dtype.element_ty)))  # do @ S_iᵀ: [BT, BK]
            else:
                gs = tl.dot(g, tl.trans(S.to(tl.float32)), input_precision="ieee")
            dq_acc += gs * w[:, None]
            if AGG == 2:
                dz = w * (tl.sum(x * gs, 1) - delta)
                du_acc += dz[:, None] * p_i[None, :]
                tl.store(dz_buf + (i_bh * P + i) * T + t, dz, mask=m_t)
    tl.store(dq + (i_bh * T + t[:, None]) * K + kk[None, :], (dq_acc * scale).to(dq.dtype.element_ty), mask=m_tk)
    if AGG == 2:
        tl.store(du + (i_bh * T + t[:, None]) * KS + ks[None, :], (du_acc * score_scale).to(du.dtype.element_ty),
                 mask=m_t[:, None] & m_ks[None, :])


@triton.jit
def _bwd_caches(
    q, u, pool_p, seg, vis_lo, vis_hi, tok_lo, tok_hi, L, do, dz_buf,
    dS, dp,
    T, P, K, V, KS, scale, score_scale,
    AGG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
    LOW_DOT: tl.constexpr,
):
    """Per cache i and value block: dS_i = Σ_t w_ti x_t do_tᵀ over the token range that sees cache i, and (grm,
    value block 0) dp_i = score_scale Σ_t dz_ti u_t from the score gradients the token kernel stored."""
    i = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    ks = tl.arange(0, BKS)
    m_k, m_v, m_ks = kk < K, vv < V, ks < KS
    lo = tl.load(vis_lo + i)
    hi = tl.load(vis_hi + i)
    t_start = tl.load(tok_lo + i)
    t_end = tl.load(tok_hi + i)
    dS_acc = tl.zeros([BK, BV], dtype=tl.float32)
    if AGG == 2:
        p_i = tl.load(pool_p + (i_bh * P + i) * KS + ks, mask=m_ks, other=0.0).to(tl.float32)
        dp_acc = tl.zeros([BKS], dtype=tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        m_t = t < t_end
        s = tl.load(seg + t, mask=m_t, other=-1)
        visible = (lo <= s) & (s < hi) & m_t
        x = tl.load(q + (i_bh * T + t[:, None]) * K + kk[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        x = x.to(tl.float32) * scale
        g = tl.load(do + (i_bh * T + t[:, None]) * V + vv[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if AGG == 0:
            lse = tl.zeros([BT], dtype=tl.float32)
        else:
            lse = tl.load(L + i_bh * T + t, mask=m_t, other=0.0)
        if AGG == 2:
            uu = tl.load(u + (i_bh * T + t[:, None]) * KS + ks[None, :], mask=m_t[:, None] & m_ks[None, :], other=0.0)
            uu = uu.to(tl.float32)
            z = tl.sum(uu * p_i[None, :], 1) * score_scale
            if i_v == 0:
                dz = tl.load(dz_buf + (i_bh * P + i) * T + t, mask=visible, other=0.0)
                dp_acc += tl.sum(dz[:, None] * uu, 0)
        else:
            z = tl.zeros([BT], dtype=tl.float32)
        w = tl.where(visible, tl.exp(z - lse), 0.0)
        xw = x * w[:, None]
        if LOW_DOT:
            dS_acc = tl.dot(tl.trans(xw.to(q.dtype.element_ty)), g.to(q.dtype.element_ty), dS_acc)
        else:
            dS_acc = tl.dot(tl.trans(xw), g.to(tl.float32), dS_acc, input_precision="ieee")
    tl.store(dS + ((i_bh * P + i) * K + kk[:, None]) * V + vv[None, :], dS_acc.to(dS.dtype.element_ty),
             mask=m_k[:, None] & m_v[None, :])
    if AGG == 2:
        if i_v == 0:
            tl.store(dp + (i_bh * P + i) * KS + ks, (dp_acc * score_scale).to(dp.dtype.element_ty), mask=m_ks)


def _blocks(K: int, V: int, KS: int) -> dict:
    BK, BV_full, BKS = block(K), block(V), block(KS)
    if INTERPRET:  # few, large programs: the interpreter's cost is per program and per op, not per element
        return dict(BK=BK, BKS=BKS, fwd_BT=32, fwd_BV=BV_full, tok_BT=32, cache_BT=32, cache_BV=BV_full, BV=BV_full)
    tok_BT = 64 if BK * BV_full <= 128 * 128 else (32 if BK * BV_full <= 128 * 256 else 16)
    return dict(BK=BK, BKS=BKS, fwd_BT=64, fwd_BV=min(BV_full, 64), tok_BT=tok_BT, cache_BT=64,
                cache_BV=min(BV_full, 64), BV=BV_full)


def _forward(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, scale, score_scale, agg):
    B, H, T, K = q.shape
    P, V = pool_S.shape[2], pool_S.shape[-1]
    KS = u.shape[-1] if agg == GRM else 1
    bs = _blocks(K, V, KS)
    o = torch.empty(B, H, T, V, dtype=store_dtype(q.dtype), device=q.device)
    L = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, bs["fwd_BT"]), triton.cdiv(V, bs["fwd_BV"]), B * H)
    _fwd[grid](
        q, u if u is not None else q, r, p_on if p_on is not None else q, pool_p if pool_p is not None else q,
        pool_S, seg, vis_lo, vis_hi, o, L, T, P, K, V, KS, scale, score_scale,
        AGG=agg, BT=bs["fwd_BT"], BK=bs["BK"], BV=bs["fwd_BV"], BKS=bs["BKS"], LOW_DOT=low_precision_dot(q.dtype),
        **launch_options("fwd"),
    )
    return o.to(q.dtype), L


class _CachedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, scale, score_scale, agg):
        o, L = _forward(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, scale, score_scale, agg)
        ctx.save_for_backward(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, o, L)
        ctx.scale, ctx.score_scale, ctx.agg = scale, score_scale, agg
        return o

    @staticmethod
    def backward(ctx, d_o):
        q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, o, L = ctx.saved_tensors
        agg = ctx.agg
        B, H, T, K = q.shape
        P, V = pool_S.shape[2], pool_S.shape[-1]
        KS = u.shape[-1] if agg == GRM else 1
        bs = _blocks(K, V, KS)
        d_o = d_o.contiguous()
        low = low_precision_dot(q.dtype)
        # D_t = <do_t, o_t>: the softmax backward's Σ_j γ_j (do · read_j), online term included
        D = (d_o.float() * o.float()).sum(-1) if agg == GRM else L
        dq, dr = empty_for(q), empty_for(r)
        grm = agg == GRM
        du = empty_for(u) if grm else None
        dp_on = empty_for(p_on) if grm else None
        # dz_ti of the tiles that see cache i (T × P numbers: stored, because recomputing them costs a second
        # `x @ S_i` product per cache and token)
        dz = torch.empty(B, H, P, T, dtype=torch.float32, device=q.device) if grm else L
        args = (T, P, K, V, KS, ctx.scale, ctx.score_scale)
        _bwd_tokens[(triton.cdiv(T, bs["tok_BT"]), B * H)](
            q, u if grm else q, r, p_on if grm else q, pool_p if grm else q,
            pool_S, seg, vis_lo, vis_hi, L, D, d_o, dq, du if grm else dq, dr, dp_on if grm else dq, dz, *args,
            AGG=agg, BT=bs["tok_BT"], BK=bs["BK"], BV=bs["BV"], BKS=bs["BKS"], LOW_DOT=low,
            **launch_options("bwd_tokens"),
        )
        dS = empty_for(pool_S)
        dp = empty_for(pool_p) if grm else None
        # the contiguous token range that sees each cache (tokens are in segment order)
        tok_lo = torch.searchsorted(seg, vis_lo).to(torch.int32)
        tok_hi = torch.searchsorted(seg, vis_hi).to(torch.int32)
        _bwd_caches[(P, triton.cdiv(V, bs["cache_BV"]), B * H)](
            q, u if grm else q, pool_p if grm else q, seg, vis_lo, vis_hi, tok_lo, tok_hi, L, d_o, dz,
            dS, dp if grm else dS, *args,
            AGG=agg, BT=bs["cache_BT"], BK=bs["BK"], BV=bs["cache_BV"], BKS=bs["BKS"], LOW_DOT=low,
            **launch_options("bwd_caches"),
        )
        cast = lambda g, x: None if g is None else g.to(x.dtype)
        return (cast(dq, q), cast(du, u), cast(dr, r), cast(dp_on, p_on), cast(dp, pool_p), cast(dS, pool_S),
                None, None, None, None, None, None)


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
        KS = 1
    check_shape("seg", seg, (T,), "one segment index per token")
    check_shape("vis_lo", vis_lo, (P,), "one per pool entry")
    check_shape("vis_hi", vis_hi, (P,), "one per pool entry")
    reason = unsupported_reason(q, u, r, p_on, pool_p, pool_S, dims=(K, V, KS))
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
