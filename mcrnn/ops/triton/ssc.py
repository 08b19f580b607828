"""Sparse selective caching (SSC, SPEC §2.3): read only the top-k caches each token's router picked.

`ssc_read` is the kernel part: `o_t = Σ_j w_tj · (scale · q_t)ᵀ S_{pick_tj}` for picks `[B, H, T, k]` and
weights `[B, H, T, k]`. Every (token, slot) pair reads a different state, so the pairs are grouped by the cache
they read (a stable sort of `B·H·T·k` keys on the device, no host sync): one program per (cache, value block)
holds its state `[K, BV]` and runs over its pairs in tiles of `BT` gathered queries, a dense
`[BT, K] x [K, BV]` product per tile. Pairs are added into a float32 output with atomics (a token's `k` slots
live in different programs). The backward runs the same groups: `dS_i` accumulates in the program (no
atomics), `dq` and the pair weights' gradients are added atomically (`dw` over the value blocks).

A negative pick is an empty slot (no read, gradient 0): the router marks with it the slots that `topk` had to
fill with invisible caches when a token sees fewer than k.

`ssc_cached_read` is the whole SSC aggregation: the router (scores against the visible summaries, `topk`,
the softmax with the online memory) in PyTorch, the reads in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcrnn.ops.triton._common import (
    INTERPRET,
    block,
    check_shape,
    launch_options,
    low_precision_dot,
    store_dtype,
    unsupported_reason,
)
from mcrnn.ops.triton._jit import dot, operand


@triton.jit
def _ssc_fwd(
    q, w, pool_S, order, offsets, o,
    T, P, NPICK, K, V, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    g_id = tl.program_id(0).to(tl.int64)  # = (b·H + h)·P + cache: the pool flattened over B, H, P
    i_v = tl.program_id(1)
    i_bh = g_id // P
    dt = q.dtype.element_ty
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_k, m_v = kk < K, vv < V
    start = tl.load(offsets + g_id)
    end = tl.load(offsets + g_id + 1)
    if start < end:
        S = tl.load(pool_S + g_id * K * V + (kk[:, None] * V + vv[None, :]), mask=m_k[:, None] & m_v[None, :],
                    other=0.0)
        S = operand(S, dt, LOW_DOT)
        for p0 in range(start, end, BT):
            pp = p0 + tl.arange(0, BT)
            m_p = pp < end
            pair = tl.load(order + pp, mask=m_p, other=0).to(tl.int64)  # (b·H·T + h·T + t)·k + slot
            t = (pair // NPICK - i_bh * T).to(tl.int32)  # the token (pairs of one group share b, h)
            wt = tl.load(w + pair, mask=m_p, other=0.0).to(tl.float32) * scale
            x = tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_p[:, None] & m_k[None, :], other=0.0)
            out = dot(operand(x, dt, LOW_DOT), S, LOW_DOT) * wt[:, None]
            tl.atomic_add(o + i_bh * T * V + (t[:, None] * V + vv[None, :]), out, mask=m_p[:, None] & m_v[None, :])


@triton.jit
def _ssc_bwd(
    q, w, pool_S, order, offsets, do, dq, dw, dS,
    T, P, NPICK, K, V, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    g_id = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_bh = g_id // P
    dt = q.dtype.element_ty
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_k, m_v = kk < K, vv < V
    m_kv = m_k[:, None] & m_v[None, :]
    start = tl.load(offsets + g_id)
    end = tl.load(offsets + g_id + 1)
    dS_acc = tl.zeros([BK, BV], dtype=tl.float32)
    if start < end:
        S = tl.load(pool_S + g_id * K * V + (kk[:, None] * V + vv[None, :]), mask=m_kv, other=0.0)
        S = operand(S, dt, LOW_DOT)
        for p0 in range(start, end, BT):
            pp = p0 + tl.arange(0, BT)
            m_p = pp < end
            pair = tl.load(order + pp, mask=m_p, other=0).to(tl.int64)
            t = (pair // NPICK - i_bh * T).to(tl.int32)
            wt = tl.load(w + pair, mask=m_p, other=0.0).to(tl.float32) * scale
            x = tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_p[:, None] & m_k[None, :], other=0.0)
            x = operand(x, dt, LOW_DOT)
            g = tl.load(do + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_p[:, None] & m_v[None, :],
                        other=0.0)
            g = operand(g, dt, LOW_DOT)
            gw = operand(g.to(tl.float32) * wt[:, None], dt, LOW_DOT)
            dS_acc += dot(tl.trans(x), gw, LOW_DOT)
            gs = dot(g, tl.trans(S), LOW_DOT)  # do @ S_iᵀ over this value block: [BT, BK]
            tl.atomic_add(dq + i_bh * T * K + (t[:, None] * K + kk[None, :]), gs * wt[:, None],
                          mask=m_p[:, None] & m_k[None, :])
            tl.atomic_add(dw + pair, tl.sum(x.to(tl.float32) * gs, 1) * scale, mask=m_p)
    tl.store(dS + g_id * K * V + (kk[:, None] * V + vv[None, :]), dS_acc.to(dS.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int) -> dict:
    BK, BV_full = block(K), block(V)
    if INTERPRET:
        return dict(BT=32, bwd_BT=32, BK=BK, BV=BV_full)
    # the backward holds two products per tile and the [K, 64] accumulator: half the tile (ptxas spills at 64)
    return dict(BT=64 if BK <= 128 else 32, bwd_BT=32 if BK <= 128 else 16, BK=BK, BV=min(BV_full, 64))


def _group_pairs(pick: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs sorted by the cache they read: `order` (pair ids, empty slots last) and
    `offsets: [B·H·P + 1]` (group g's pairs are order[offsets[g]:offsets[g+1]])."""
    B, H, T, k = pick.shape
    bh = torch.arange(B * H, device=pick.device, dtype=torch.int64).view(B, H, 1, 1)
    n_groups = B * H * P
    key = torch.where(pick >= 0, bh * P + pick.long(), n_groups).reshape(-1)
    order = torch.argsort(key, stable=True).to(torch.int32 if key.numel() < 2**31 else torch.int64)
    counts = torch.bincount(key, minlength=n_groups + 1)[:n_groups]
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=pick.device)
    offsets[1:] = counts.cumsum(0)
    return order, offsets


class _SSCRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, pool_S, pick, scale):
        B, H, T, K = q.shape
        P, V = pool_S.shape[2], pool_S.shape[-1]
        k = pick.shape[-1]
        order, offsets = _group_pairs(pick, P)
        bs = _blocks(K, V)
        states = pool_S.to(q.dtype) if low_precision_dot(q.dtype) else pool_S
        o = torch.zeros(B, H, T, V, dtype=torch.float32, device=q.device)
        _ssc_fwd[(B * H * P, triton.cdiv(V, bs["BV"]))](
            q, w, states, order, offsets, o, T, P, k, K, V, scale,
            BT=bs["BT"], BK=bs["BK"], BV=bs["BV"], LOW_DOT=low_precision_dot(q.dtype), **launch_options("ssc_fwd"),
        )
        ctx.save_for_backward(q, w, states, order, offsets)
        ctx.scale, ctx.pool_dtype = scale, pool_S.dtype
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, d_o):
        q, w, pool_S, order, offsets = ctx.saved_tensors
        B, H, T, K = q.shape
        P, V = pool_S.shape[2], pool_S.shape[-1]
        k = w.shape[-1]
        bs = _blocks(K, V)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=q.device)
        dS = torch.empty(pool_S.shape, dtype=store_dtype(ctx.pool_dtype), device=q.device)
        _ssc_bwd[(B * H * P, triton.cdiv(V, bs["BV"]))](
            q, w, pool_S, order, offsets, d_o.contiguous(), dq, dw, dS, T, P, k, K, V, ctx.scale,
            BT=bs["bwd_BT"], BK=bs["BK"], BV=bs["BV"], LOW_DOT=low_precision_dot(q.dtype), **launch_options("ssc_bwd"),
        )
        return dq.to(q.dtype), dw.to(w.dtype), dS.to(ctx.pool_dtype), None, None


def ssc_read(
    q: torch.Tensor, weights: torch.Tensor, pool_S: torch.Tensor, pick: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """`o_t = Σ_j weights_tj · (scale · q_t)ᵀ pool_S[pick_tj]`, reading only the picked states.

    Args (heads-first):
        q: `[B, H, T, K]`; weights: `[B, H, T, k]`; pool_S: `[B, H, P, K, V]`;
        pick: `[B, H, T, k]` integer indices into the pool's dim 2; a negative pick is an empty slot.
    Returns:
        `o: [B, H, T, V]` in q's dtype, differentiable w.r.t. q, weights and pool_S.
    """
    if q.dim() != 4:
        raise ValueError(f"`q` must be [B, H, T, K] (heads-first), got shape {list(q.shape)}")
    B, H, T, K = q.shape
    if pool_S.dim() != 5 or tuple(pool_S.shape[:2]) != (B, H) or pool_S.shape[3] != K:
        raise ValueError(f"`pool_S` must be [B, H, P, K, V] = [{B}, {H}, P, {K}, V], got {list(pool_S.shape)}")
    if pick.dim() != 4 or tuple(pick.shape[:3]) != (B, H, T) or pick.dtype.is_floating_point:
        raise ValueError(f"`pick` must be an integer tensor [B, H, T, k] = [{B}, {H}, {T}, k], got "
                         f"{pick.dtype} {list(pick.shape)}")
    check_shape("weights", weights, tuple(pick.shape), "one weight per pick")
    reason = unsupported_reason(q, weights, pool_S, dims=(K, pool_S.shape[4]))
    if reason:
        raise ValueError(f"ssc_read cannot run the Triton kernels on these inputs: {reason}")
    P = pool_S.shape[2]
    if T == 0 or P == 0 or pick.shape[-1] == 0:
        return q.new_zeros(B, H, T, pool_S.shape[4])
    return _SSCRead.apply(q.contiguous(), weights.contiguous(), pool_S.contiguous(), pick.to(q.device), float(scale))


def ssc_cached_read(
    q: torch.Tensor,
    u: torch.Tensor | None,
    r: torch.Tensor,
    p_on: torch.Tensor,
    pool_p: torch.Tensor,
    pool_S: torch.Tensor,
    seg: torch.Tensor,
    vis_lo: torch.Tensor,
    vis_hi: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    score_scale: float | None = None,
) -> torch.Tensor:
    """The SSC aggregation (SPEC §2.3): `o_t = γ_on r_t + Σ_{i ∈ top-k} γ_ti (scale · q_t)ᵀ S_i`, γ the softmax
    over the selected scores and the online one. Same arguments as :func:`cached_read` plus `top_k`.

    The router (`[B, H, T, P]` scores, `topk`, softmax: `T × P` numbers, never `T × P × V`) stays in PyTorch,
    so its gradients flow by autograd; the reads of the selected states run in :func:`ssc_read`."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"`top_k` must be an integer >= 1, got {top_k!r}")
    B, H, T, K = q.shape
    P = pool_S.shape[2]
    u = q if u is None else u
    KS = u.shape[-1]
    check_shape("p_on", p_on, (B, H, T, KS))
    check_shape("pool_p", pool_p, (B, H, P, KS))
    check_shape("seg", seg, (T,), "one segment index per token")
    check_shape("vis_lo", vis_lo, (P,), "one per pool entry")
    check_shape("vis_hi", vis_hi, (P,), "one per pool entry")
    score_scale = KS**-0.5 if score_scale is None else score_scale
    if P == 0 or T == 0:
        return r.to(q.dtype)
    seg, vis_lo, vis_hi = (x.to(q.device).long() for x in (seg, vis_lo, vis_hi))
    visible = (vis_lo <= seg[:, None]) & (seg[:, None] < vis_hi)  # [T, P]
    uf = u.float()
    z = torch.einsum("bhtk,bhpk->bhtp", uf, pool_p.float()) * score_scale
    z = z.masked_fill(~visible, float("-inf"))
    z_on = (uf * p_on.float()).sum(-1, keepdim=True) * score_scale
    z_sel, pick = z.topk(min(top_k, P), dim=-1)
    gamma = torch.softmax(torch.cat([z_sel, z_on], dim=-1), dim=-1)
    # topk fills the slots of a token that sees fewer than k caches with invisible ones (score -inf, γ 0)
    pick = torch.where(torch.isinf(z_sel), -1, pick)
    o = ssc_read(q, gamma[..., :-1], pool_S, pick, scale=scale).float()
    return (gamma[..., -1:] * r.float() + o).to(q.dtype)
