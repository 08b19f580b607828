"""The base memory's scan: `S_t = a_t S_{t-1} + k_t v_tᵀ`, `o_t = q_tᵀ S_t`, with resets and snapshots.

The contract of :func:`mcrnn.ops.linear.chunk.linear_scan` (heads-first, `q` already scaled), chunk by chunk
of `BT` tokens. Inside chunk `n` (tokens `t`, local cumulative log decay `g_t`, incoming state `h_n`):

    o_t     = w_t · q_tᵀ h_n + Σ_{s ≤ t, same group} exp(g_t − g_s) (q_t·k_s) v_s,  w_t = [t in h_n's group] exp(g_t)
    h_{n+1} = c_n · h_n + Σ_{s in the last group} exp(g_L − g_s) k_s v_sᵀ,        c_n = [no reset in n] exp(g_L)

A *group* is a run of tokens between resets: `gid_t` = number of resets at positions `<= t` (a reset at `t`
restarts the state before `t`'s update), so the pairs `(t, s)` across a reset are masked and the carried state
only reaches tokens before the chunk's first reset; the initial state is group 0. `L` is the chunk's last token.
A snapshot at an exclusive end `e` (token `p = e − 1` of chunk `n`) is the same sum as `h_{n+1}` with `p` for
`L` and `s <= p`.

Kernels (`BT` tokens per chunk, K in one block of `BK`, V split in blocks of `BV`):

- `_fwd_states`, one program per (value block, batch·head), sequential over the chunks: the state tile
  `[BK, BV]` float32 stays in registers; per chunk one `[BK, BT] x [BT, BV]` product. Writes every `h_n`
  (`h: [B, H, NT + 1, K, V]` float32, `h[NT]` the final state).
- `_fwd_out`, per (chunk, value block, batch·head): `A = (q kᵀ) ⊙ D` `[BT, BT]` (D: decay ratios, causal and
  group mask), `o = A v + w ⊙ (q h_n)`.
- `_fwd_snap`, per (snapshot, value block, batch·head): `h_n` and the chunk's prefix up to `p`.
- `_bwd_states`, per (value block, batch·head), the chunks in reverse: `dh` `[BK, BV]` float32 in registers,
  `dh_n = c_n dh_{n+1} + (w ⊙ q)ᵀ do + Σ_{snapshots in n} [group] exp(g_p) dsnap`. Writes `dhe[n] = dh_{n+1}`
  (the gradient of chunk n's end state) and the initial state's gradient; and, with a decay, the partial sums
  of `<h_{n+1}, dh_{n+1}>` per value block (the decay gradient's term at each chunk end).
- `_bwd_dv`, per (chunk, value block, batch·head), full K: `dv = Aᵀ do + e ⊙ (k dhe) + Σ_snap ws ⊙ (k dsnap)`
  (`e_s = exp(g_L − g_s)` in the last group, `ws` the same towards the snapshot's token).
- `_bwd_dqk`, per (chunk, key block, batch·head), a loop over value blocks: `dA = (do vᵀ) ⊙ D` (recomputed by
  every key block, it needs no keys), `dq = dA k + w ⊙ (do h_nᵀ)`, `dk = dAᵀ q + e ⊙ (v dheᵀ) + Σ_snap ws ⊙
  (v dsnapᵀ)`, and `q·dq − k·dk` per token over the block (summed over the key blocks in torch).

The decay gradient is then assembled in torch (as fla does for scalar decays): every term of the forward pass
is `exp(g_a − g_b)` times something linear in it, so `∂/∂g_t = q_t·dq_t − k_t·dk_t`, plus `<h_{n+1}, dh_{n+1}>`
at each chunk's last token and `<snap_e, dsnap_e>` at each snapshot's token (these have no query); the gradient
of `log_decay` is the reverse cumulative sum of that inside each chunk (`g` is the chunk-local cumsum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mcrnn.ops.triton._common import (
    block,
    empty_for,
    launch_options,
    low_precision_dot,
    store_dtype,
    unsupported_reason,
)
from mcrnn.ops.triton._jit import dot, operand


@triton.jit
def _chunk_groups(gid, i_t, t, m_t, T, BT: tl.constexpr):
    """The tokens' reset groups, the group of the incoming state and the chunk's last valid token."""
    gid_t = tl.load(gid + t, mask=m_t, other=-1)
    gid_in = tl.where(i_t > 0, tl.load(gid + tl.maximum(i_t * BT - 1, 0)), 0)
    last = tl.minimum((i_t + 1) * BT, T) - 1
    return gid_t, gid_in, last


@triton.jit
def _decay_ratios(g_t, pair, USE_G: tl.constexpr):
    """`D[t, s] = exp(g_t − g_s)` on the pairs (masked before the exp: no overflow), else 0: `[BT, BT]`."""
    if USE_G:
        return tl.exp(tl.where(pair, g_t[:, None] - g_t[None, :], float("-inf")))
    else:
        return tl.where(pair, 1.0, 0.0)


@triton.jit
def _fwd_states(
    k, v, g, gid, h0, h,
    T, K, V, NT,
    USE_G: tl.constexpr, USE_H0: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """h[n] = the state entering chunk n, h[NT] = the final state; sequential over the chunks."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    dt = k.dtype.element_ty
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_k, m_v = kk < K, vv < V
    m_kv = m_k[:, None] & m_v[None, :]
    tile = kk[:, None] * V + vv[None, :]
    if USE_H0:
        state = tl.load(h0 + i_bh * K * V + tile, mask=m_kv, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(0, NT):
        tl.store(h + (i_bh * (NT + 1) + i_t) * K * V + tile, state, mask=m_kv)
        t = i_t * BT + tl.arange(0, BT)
        m_t = t < T
        gid_t, gid_in, last = _chunk_groups(gid, i_t, t, m_t, T, BT)
        gid_last = tl.load(gid + last)
        keep = m_t & (gid_t == gid_last)
        if USE_G:
            g_t = tl.load(g + i_bh * T + t, mask=m_t, other=0.0)
            g_last = tl.load(g + i_bh * T + last)
            w = tl.exp(tl.where(keep, g_last - g_t, float("-inf")))
            carry = tl.where(gid_last == gid_in, tl.exp(g_last), 0.0)
        else:
            w = tl.where(keep, 1.0, 0.0)
            carry = tl.where(gid_last == gid_in, 1.0, 0.0)
        kt = tl.load(k + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_t[:, None] & m_k[None, :], other=0.0)
        vt = tl.load(v + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_t[:, None] & m_v[None, :], other=0.0)
        kw = operand(kt.to(tl.float32) * w[:, None], dt, LOW_DOT)
        state = state * carry + dot(tl.trans(kw), operand(vt, dt, LOW_DOT), LOW_DOT)
    tl.store(h + (i_bh * (NT + 1) + NT) * K * V + tile, state, mask=m_kv)


@triton.jit
def _fwd_out(
    q, k, v, g, gid, h, o,
    T, K, V, NT,
    USE_G: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """o = ((q kᵀ) ⊙ D) v + w ⊙ (q h_n) for one chunk and value block."""
    i_t = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    dt = q.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = t < T, kk < K, vv < V
    gid_t, gid_in, last = _chunk_groups(gid, i_t, t, m_t, T, BT)
    pair = (t[:, None] >= t[None, :]) & (gid_t[:, None] == gid_t[None, :]) & m_t[None, :]
    if USE_G:
        g_t = tl.load(g + i_bh * T + t, mask=m_t, other=0.0)
        w = tl.exp(tl.where(m_t & (gid_t == gid_in), g_t, float("-inf")))
    else:
        g_t = tl.zeros([BT], dtype=tl.float32)
        w = tl.where(m_t & (gid_t == gid_in), 1.0, 0.0)
    D = _decay_ratios(g_t, pair, USE_G)
    m_tk = m_t[:, None] & m_k[None, :]
    qt = operand(tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0), dt, LOW_DOT)
    kt = operand(tl.load(k + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0), dt, LOW_DOT)
    A = dot(qt, tl.trans(kt), LOW_DOT) * D
    m_tv = m_t[:, None] & m_v[None, :]
    vt = operand(tl.load(v + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0), dt, LOW_DOT)
    hn = tl.load(h + (i_bh * (NT + 1) + i_t) * K * V + (kk[:, None] * V + vv[None, :]),
                 mask=m_k[:, None] & m_v[None, :], other=0.0)
    acc = dot(operand(A, dt, LOW_DOT), vt, LOW_DOT) + dot(qt, operand(hn, dt, LOW_DOT), LOW_DOT) * w[:, None]
    tl.store(o + i_bh * T * V + (t[:, None] * V + vv[None, :]), acc.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _fwd_snap(
    k, v, g, gid, h, snap_tok, snaps,
    T, K, V, NT, E,
    USE_G: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """The state after token p = snap_tok[e]: h_n carried to p plus the chunk's tokens up to p."""
    i_e = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    dt = k.dtype.element_ty
    p = tl.load(snap_tok + i_e)
    i_t = p // BT
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = t <= p, kk < K, vv < V
    m_kv = m_k[:, None] & m_v[None, :]
    gid_t, gid_in, _ = _chunk_groups(gid, i_t, t, m_t, T, BT)
    gid_p = tl.load(gid + p)
    keep = m_t & (gid_t == gid_p)
    if USE_G:
        g_t = tl.load(g + i_bh * T + t, mask=m_t, other=0.0)
        g_p = tl.load(g + i_bh * T + p)
        w = tl.exp(tl.where(keep, g_p - g_t, float("-inf")))
        carry = tl.where(gid_p == gid_in, tl.exp(g_p), 0.0)
    else:
        w = tl.where(keep, 1.0, 0.0)
        carry = tl.where(gid_p == gid_in, 1.0, 0.0)
    kt = tl.load(k + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_t[:, None] & m_k[None, :], other=0.0)
    vt = tl.load(v + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_t[:, None] & m_v[None, :], other=0.0)
    hn = tl.load(h + (i_bh * (NT + 1) + i_t) * K * V + (kk[:, None] * V + vv[None, :]), mask=m_kv, other=0.0)
    kw = operand(kt.to(tl.float32) * w[:, None], dt, LOW_DOT)
    snap = hn * carry + dot(tl.trans(kw), operand(vt, dt, LOW_DOT), LOW_DOT)
    tl.store(snaps + (i_bh * E + i_e) * K * V + (kk[:, None] * V + vv[None, :]), snap, mask=m_kv)


@triton.jit
def _bwd_states(
    q, g, gid, h, do, dsnap, sorted_tok, snap_idx, snap_off, dfinal, dhe, dh0, dg_end,
    T, K, V, NT, E,
    USE_G: tl.constexpr, HAS_O: tl.constexpr, HAS_SNAP: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """dh over the chunks in reverse: dhe[n] = the gradient of chunk n's end state, dh0 of the initial one."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    NV = tl.num_programs(0)
    dt = q.dtype.element_ty
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_k, m_v = kk < K, vv < V
    m_kv = m_k[:, None] & m_v[None, :]
    tile = kk[:, None] * V + vv[None, :]
    dstate = tl.load(dfinal + i_bh * K * V + tile, mask=m_kv, other=0.0).to(tl.float32)
    for j in range(0, NT):
        i_t = NT - 1 - j
        tl.store(dhe + (i_bh * NT + i_t) * K * V + tile, dstate, mask=m_kv)
        t = i_t * BT + tl.arange(0, BT)
        m_t = t < T
        gid_t, gid_in, last = _chunk_groups(gid, i_t, t, m_t, T, BT)
        gid_last = tl.load(gid + last)
        if USE_G:
            g_t = tl.load(g + i_bh * T + t, mask=m_t, other=0.0)
            g_last = tl.load(g + i_bh * T + last)
            carry = tl.where(gid_last == gid_in, tl.exp(g_last), 0.0)
            # the decay gradient's term at the chunk's last token: <h_{n+1}, dh_{n+1}> over this value block
            h_next = tl.load(h + (i_bh * (NT + 1) + i_t + 1) * K * V + tile, mask=m_kv, other=0.0)
            tl.store(dg_end + (i_bh * NV + i_v) * NT + i_t, tl.sum(tl.sum(h_next * dstate, 1), 0))
        else:
            carry = tl.where(gid_last == gid_in, 1.0, 0.0)
        dstate = dstate * carry
        if HAS_O:
            if USE_G:
                w = tl.exp(tl.where(m_t & (gid_t == gid_in), g_t, float("-inf")))
            else:
                w = tl.where(m_t & (gid_t == gid_in), 1.0, 0.0)
            qt = tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_t[:, None] & m_k[None, :],
                         other=0.0)
            gt = tl.load(do + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_t[:, None] & m_v[None, :],
                         other=0.0)
            qw = operand(qt.to(tl.float32) * w[:, None], dt, LOW_DOT)
            dstate += dot(tl.trans(qw), operand(gt, dt, LOW_DOT), LOW_DOT)
        if HAS_SNAP:
            for jj in range(tl.load(snap_off + i_t), tl.load(snap_off + i_t + 1)):
                p = tl.load(sorted_tok + jj)
                e = tl.load(snap_idx + jj).to(tl.int64)
                gid_p = tl.load(gid + p)
                if USE_G:
                    c = tl.where(gid_p == gid_in, tl.exp(tl.load(g + i_bh * T + p)), 0.0)
                else:
                    c = tl.where(gid_p == gid_in, 1.0, 0.0)
                ds = tl.load(dsnap + (i_bh * E + e) * K * V + tile, mask=m_kv, other=0.0).to(tl.float32)
                dstate += ds * c
    tl.store(dh0 + i_bh * K * V + tile, dstate, mask=m_kv)


@triton.jit
def _bwd_dv(
    q, k, g, gid, do, dhe, dsnap, sorted_tok, snap_idx, snap_off, dv,
    T, K, V, NT, E,
    USE_G: tl.constexpr, HAS_O: tl.constexpr, HAS_SNAP: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """dv of one chunk and value block (full K): Aᵀ do + e ⊙ (k dhe) + Σ_snap ws ⊙ (k dsnap)."""
    i_t = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    dt = k.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = t < T, kk < K, vv < V
    m_tk, m_tv, m_kv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
    tile = kk[:, None] * V + vv[None, :]
    gid_t, gid_in, last = _chunk_groups(gid, i_t, t, m_t, T, BT)
    to_end = m_t & (gid_t == tl.load(gid + last))
    if USE_G:
        g_t = tl.load(g + i_bh * T + t, mask=m_t, other=0.0)
        e_end = tl.exp(tl.where(to_end, tl.load(g + i_bh * T + last) - g_t, float("-inf")))
    else:
        g_t = tl.zeros([BT], dtype=tl.float32)
        e_end = tl.where(to_end, 1.0, 0.0)
    kd = operand(tl.load(k + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0), dt, LOW_DOT)
    dh_end = operand(tl.load(dhe + (i_bh * NT + i_t) * K * V + tile, mask=m_kv, other=0.0), dt, LOW_DOT)
    dv_b = dot(kd, dh_end, LOW_DOT) * e_end[:, None]
    if HAS_O:
        pair = (t[:, None] >= t[None, :]) & (gid_t[:, None] == gid_t[None, :]) & m_t[None, :]
        qd = operand(tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0), dt, LOW_DOT)
        A_T = operand(tl.trans(dot(qd, tl.trans(kd), LOW_DOT) * _decay_ratios(g_t, pair, USE_G)), dt, LOW_DOT)
        gt = operand(tl.load(do + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0), dt, LOW_DOT)
        dv_b += dot(A_T, gt, LOW_DOT)
    if HAS_SNAP:
        for jj in range(tl.load(snap_off + i_t), tl.load(snap_off + i_t + 1)):
            p = tl.load(sorted_tok + jj)
            e = tl.load(snap_idx + jj).to(tl.int64)
            keep = m_t & (t <= p) & (gid_t == tl.load(gid + p))
            if USE_G:
                ws = tl.exp(tl.where(keep, tl.load(g + i_bh * T + p) - g_t, float("-inf")))
            else:
                ws = tl.where(keep, 1.0, 0.0)
            ds = operand(tl.load(dsnap + (i_bh * E + e) * K * V + tile, mask=m_kv, other=0.0), dt, LOW_DOT)
            dv_b += dot(kd, ds, LOW_DOT) * ws[:, None]
    tl.store(dv + i_bh * T * V + (t[:, None] * V + vv[None, :]), dv_b.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_dqk(
    q, k, v, g, gid, h, do, dhe, dsnap, sorted_tok, snap_idx, snap_off, dq, dk, dg,
    T, K, V, NT, E,
    USE_G: tl.constexpr, HAS_O: tl.constexpr, HAS_SNAP: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW_DOT: tl.constexpr,
):
    """dq, dk of one chunk and key block, the values in a loop; `q·dq − k·dk` over this key block into dg.

    `dA = (do vᵀ) ⊙ D` needs no keys, so each key block recomputes it (fla's split) instead of holding all of K."""
    i_t = tl.program_id(0)
    i_k = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    dt = k.dtype.element_ty
    t = i_t * BT + tl.arange(0, BT)
    kk = i_k * BK + tl.arange(0, BK)
    m_t, m_k = t < T, kk < K
    m_tk = m_t[:, None] & m_k[None, :]
    gid_t, gid_in, last = _chunk_groups(gid, i_t, t, m_t, T, BT)
    to_end = m_t & (gid_t == tl.load(gid + last))
    if USE_G:
        g_t = tl.load(g + i_bh * T + t, mask=m_t, other=0.0)
        e_end = tl.exp(tl.where(to_end, tl.load(g + i_bh * T + last) - g_t, float("-inf")))
    else:
        g_t = tl.zeros([BT], dtype=tl.float32)
        e_end = tl.where(to_end, 1.0, 0.0)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_O:
        dA = tl.zeros([BT, BT], dtype=tl.float32)
        dq_in = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_SNAP:
        snap_lo = tl.load(snap_off + i_t)
        snap_hi = tl.load(snap_off + i_t + 1)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        m_v = vv < V
        m_tv, m_kv = m_t[:, None] & m_v[None, :], m_k[:, None] & m_v[None, :]
        tile = kk[:, None] * V + vv[None, :]
        vt = operand(tl.load(v + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0), dt, LOW_DOT)
        dh_end = operand(tl.load(dhe + (i_bh * NT + i_t) * K * V + tile, mask=m_kv, other=0.0), dt, LOW_DOT)
        dk_acc += dot(vt, tl.trans(dh_end), LOW_DOT) * e_end[:, None]
        if HAS_O:
            gt = operand(tl.load(do + i_bh * T * V + (t[:, None] * V + vv[None, :]), mask=m_tv, other=0.0), dt,
                         LOW_DOT)
            hn = operand(tl.load(h + (i_bh * (NT + 1) + i_t) * K * V + tile, mask=m_kv, other=0.0), dt, LOW_DOT)
            dA += dot(gt, tl.trans(vt), LOW_DOT)
            dq_in += dot(gt, tl.trans(hn), LOW_DOT)
        if HAS_SNAP:
            for jj in range(snap_lo, snap_hi):
                p = tl.load(sorted_tok + jj)
                e = tl.load(snap_idx + jj).to(tl.int64)
                keep = m_t & (t <= p) & (gid_t == tl.load(gid + p))
                if USE_G:
                    ws = tl.exp(tl.where(keep, tl.load(g + i_bh * T + p) - g_t, float("-inf")))
                else:
                    ws = tl.where(keep, 1.0, 0.0)
                ds = operand(tl.load(dsnap + (i_bh * E + e) * K * V + tile, mask=m_kv, other=0.0), dt, LOW_DOT)
                dk_acc += dot(vt, tl.trans(ds), LOW_DOT) * ws[:, None]
    kt = tl.load(k + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0)
    if HAS_O:
        if USE_G:
            w = tl.exp(tl.where(m_t & (gid_t == gid_in), g_t, float("-inf")))
        else:
            w = tl.where(m_t & (gid_t == gid_in), 1.0, 0.0)
        pair = (t[:, None] >= t[None, :]) & (gid_t[:, None] == gid_t[None, :]) & m_t[None, :]
        dA = operand(dA * _decay_ratios(g_t, pair, USE_G), dt, LOW_DOT)
        qt = tl.load(q + i_bh * T * K + (t[:, None] * K + kk[None, :]), mask=m_tk, other=0.0)
        dq_acc = dot(dA, operand(kt, dt, LOW_DOT), LOW_DOT) + dq_in * w[:, None]
        dk_acc += dot(tl.trans(dA), operand(qt, dt, LOW_DOT), LOW_DOT)
        tl.store(dq + i_bh * T * K + (t[:, None] * K + kk[None, :]), dq_acc.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + i_bh * T * K + (t[:, None] * K + kk[None, :]), dk_acc.to(dk.dtype.element_ty), mask=m_tk)
    if USE_G:
        dg_t = -tl.sum(kt.to(tl.float32) * dk_acc, 1)
        if HAS_O:
            dg_t += tl.sum(qt.to(tl.float32) * dq_acc, 1)
        B_H = tl.num_programs(2)
        tl.store(dg + (i_k * B_H + i_bh) * T + t, dg_t, mask=m_t)


def _blocks(K: int, V: int) -> dict:
    BK, BV_full = block(K), block(V)
    BT = 64 if max(BK, BV_full) <= 128 else 32  # the chunk: [BT, BT] score tiles next to [BT, K] ones
    # blocks of 64 in the interpreter too (its cost is per program and op, and small test dims fit in one block
    # anyway): a test with K or V above 64 then runs the split paths the GPU runs
    return dict(BT=BT, BK=BK, BV=min(BV_full, 64), dqk_BK=min(BK, 64))


def _local_cumsum(log_decay: torch.Tensor, BT: int) -> torch.Tensor:
    """`g: [B, H, T]` float32, the cumulative log decay inside each chunk of BT tokens."""
    B, H, T = log_decay.shape
    NT = triton.cdiv(T, BT)
    g = torch.nn.functional.pad(log_decay.float(), (0, NT * BT - T)).view(B, H, NT, BT).cumsum(-1)
    return g.view(B, H, NT * BT)[:, :, :T].contiguous()


def _reverse_local_cumsum(x: torch.Tensor, BT: int) -> torch.Tensor:
    B, H, T = x.shape
    NT = triton.cdiv(T, BT)
    x = torch.nn.functional.pad(x, (0, NT * BT - T)).view(B, H, NT, BT)
    return x.flip(-1).cumsum(-1).flip(-1).reshape(B, H, NT * BT)[:, :, :T]


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, h0, gid, snap_tok, sorted_tok, snap_idx, snap_off):
        ctx.set_materialize_grads(False)
        B, H, T, K = k.shape
        V = v.shape[-1]
        E = snap_tok.numel()
        bs = _blocks(K, V)
        BT = bs["BT"]
        NT = triton.cdiv(T, BT)
        low = low_precision_dot(k.dtype)
        use_g = log_decay is not None
        g = _local_cumsum(log_decay, BT) if use_g else None
        h = torch.empty(B, H, NT + 1, K, V, dtype=torch.float32, device=k.device)
        consts = dict(BT=BT, BK=bs["BK"], LOW_DOT=low)
        _fwd_states[(triton.cdiv(V, bs["BV"]), B * H)](
            k, v, g if use_g else k, gid, h0 if h0 is not None else h, h, T, K, V, NT,
            USE_G=use_g, USE_H0=h0 is not None, BV=bs["BV"], **consts, **launch_options("scan_states"),
        )
        o = None
        if q is not None:
            o = torch.empty(B, H, T, V, dtype=store_dtype(q.dtype), device=q.device)
            _fwd_out[(NT, triton.cdiv(V, bs["BV"]), B * H)](
                q, k, v, g if use_g else k, gid, h, o, T, K, V, NT,
                USE_G=use_g, BV=bs["BV"], **consts, **launch_options("scan_out"),
            )
            o = o.to(q.dtype)
        snaps = None
        if E:
            snaps = torch.empty(B, H, E, K, V, dtype=torch.float32, device=k.device)
            _fwd_snap[(E, triton.cdiv(V, bs["BV"]), B * H)](
                k, v, g if use_g else k, gid, h, snap_tok, snaps, T, K, V, NT, E,
                USE_G=use_g, BV=bs["BV"], **consts, **launch_options("scan_snap"),
            )
        final = h[:, :, NT].clone()
        ctx.save_for_backward(q, k, v, g, h, snaps, gid, snap_tok, sorted_tok, snap_idx, snap_off)
        ctx.dtypes = (None if log_decay is None else log_decay.dtype, None if h0 is None else h0.dtype)
        return o, snaps, final

    @staticmethod
    def backward(ctx, d_o, d_snaps, d_final):
        q, k, v, g, h, snaps, gid, snap_tok, sorted_tok, snap_idx, snap_off = ctx.saved_tensors
        g_dtype, h0_dtype = ctx.dtypes
        B, H, T, K = k.shape
        V = v.shape[-1]
        E = snap_tok.numel()
        NT = h.shape[2] - 1
        bs = _blocks(K, V)
        BT = bs["BT"]
        low = low_precision_dot(k.dtype)
        use_g = g is not None
        has_o = q is not None and d_o is not None
        has_snap = E > 0 and d_snaps is not None
        d_o = d_o.contiguous() if has_o else None
        d_snaps = d_snaps.contiguous() if has_snap else None
        d_final = torch.zeros(B, H, K, V, dtype=torch.float32, device=k.device) if d_final is None else d_final
        d_final = d_final.contiguous()
        consts = dict(USE_G=use_g, HAS_O=has_o, HAS_SNAP=has_snap, BT=BT, BK=bs["BK"], LOW_DOT=low)
        placeholder = h
        dhe = torch.empty(B, H, NT, K, V, dtype=torch.float32, device=k.device)
        dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=k.device)
        NV = triton.cdiv(V, bs["BV"])
        dg_end = torch.empty(B, H, NV, NT, dtype=torch.float32, device=k.device) if use_g else placeholder
        _bwd_states[(NV, B * H)](
            q if has_o else k, g if use_g else placeholder, gid, h, d_o if has_o else placeholder,
            d_snaps if has_snap else placeholder, sorted_tok, snap_idx, snap_off, d_final, dhe, dh0, dg_end,
            T, K, V, NT, E, BV=bs["BV"], **consts, **launch_options("scan_bwd_states"),
        )
        dq = empty_for(q) if q is not None else None
        dk, dv = empty_for(k), empty_for(v)
        snap_args = (d_snaps if has_snap else placeholder, sorted_tok, snap_idx, snap_off)
        _bwd_dv[(NT, NV, B * H)](
            q if has_o else k, k, g if use_g else placeholder, gid, d_o if has_o else placeholder, dhe, *snap_args,
            dv, T, K, V, NT, E, BV=bs["BV"], **consts, **launch_options("scan_bwd_dv"),
        )
        NK = triton.cdiv(K, bs["dqk_BK"])
        dg = torch.empty(NK, B, H, T, dtype=torch.float32, device=k.device) if use_g else placeholder
        _bwd_dqk[(NT, NK, B * H)](
            q if has_o else k, k, v, g if use_g else placeholder, gid, h, d_o if has_o else placeholder, dhe,
            *snap_args, dq if has_o else placeholder, dk, dg, T, K, V, NT, E,
            BV=bs["BV"], **dict(consts, BK=bs["dqk_BK"]), **launch_options("scan_bwd_dqk"),
        )
        if q is not None:
            dq = dq.to(q.dtype) if has_o else torch.zeros_like(q)
        d_log_decay = None
        if use_g:
            # the terms without a query: <h_{n+1}, dh_{n+1}> at each chunk's last token, <snap, dsnap> at each
            # snapshot's token
            dg = dg.sum(0)
            last = (torch.arange(1, NT + 1, device=k.device) * BT).clamp_max(T) - 1
            dg.index_add_(2, last, dg_end.sum(2))
            if has_snap:
                dg.index_add_(2, snap_tok.long(), torch.einsum("bhekv,bhekv->bhe", snaps, d_snaps.float()))
            d_log_decay = _reverse_local_cumsum(dg, BT).to(g_dtype)
        dh0 = dh0.to(h0_dtype) if h0_dtype is not None else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), d_log_decay, dh0, None, None, None, None, None


def _index(values: Sequence[int], name: str, lo: int, hi: int) -> torch.Tensor:
    x = torch.as_tensor(list(values), dtype=torch.long)
    if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
        raise ValueError(f"`{name}` must lie in [{lo}, {hi}], got {list(values)}")
    return x


def chunk_scan(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    resets: Sequence[int] = (),
    initial_state: torch.Tensor | None = None,
    positions: Sequence[int] = (),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """`S_t = a_t S_{t-1} + k_t v_tᵀ`, `o_t = q_tᵀ S_t` in the Triton kernels: `linear_scan`'s contract.

    Args (heads-first, `q` already scaled; float32 / bf16 / fp16):
        q: `[B, H, T, K]` or None (then no output); k: `[B, H, T, K]`; v: `[B, H, T, V]`.
        log_decay: `[B, H, T]` log of the gate `a_t` (None: no decay; finite, e.g. `_log_decay`'s floor of -60).
        resets: token positions in `[0, T)` where the state restarts from zero before that token's update.
        initial_state: `[B, H, K, V]` (None: zeros).
        positions: exclusive ends `e` in `[1, T]` whose state (after token `e − 1`) is returned, any order.
    Returns:
        `o: [B, H, T, V]` in q's dtype (None when q is None), the snapshots `[B, H, len(positions), K, V]`
        (None when empty) and the final state `[B, H, K, V]`, both float32. Differentiable w.r.t. q, k, v,
        log_decay and initial_state through all three outputs.
    """
    if k.dim() != 4:
        raise ValueError(f"`k` must be [B, H, T, K] (heads-first), got shape {list(k.shape)}")
    B, H, T, K = k.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"`v` must be [B, H, T, V] = [{B}, {H}, {T}, V], got {list(v.shape)}")
    V = v.shape[-1]
    if q is not None and tuple(q.shape) != (B, H, T, K):
        raise ValueError(f"`q` must have shape {[B, H, T, K]} like `k`, got {list(q.shape)}")
    if log_decay is not None and tuple(log_decay.shape) != (B, H, T):
        raise ValueError(f"`log_decay` must have shape {[B, H, T]}, got {list(log_decay.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"`initial_state` must have shape {[B, H, K, V]}, got {list(initial_state.shape)}")
    reason = scan_unsupported_reason(q, k, v, log_decay, initial_state)
    if reason:
        raise ValueError(f"chunk_scan cannot run the Triton kernels on these inputs: {reason}")
    dev = k.device
    reset_pos = _index(resets, "resets", 0, T - 1)
    ends = _index(positions, "positions", 1, T)
    flags = torch.zeros(T, dtype=torch.int32)
    flags[reset_pos] = 1
    gid = flags.cumsum(0, dtype=torch.int32)  # the reset group of every token (0: the initial state's)
    snap_tok = (ends - 1).to(torch.int32)
    # the snapshots by chunk, for the backward pass's loops over the snapshots of one chunk
    BT = _blocks(K, V)["BT"]
    order = torch.argsort(snap_tok, stable=True)
    counts = torch.bincount(snap_tok.long() // BT, minlength=triton.cdiv(T, BT))
    snap_off = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    snap_off[1:] = counts.cumsum(0)
    index = [x.to(dev) for x in (gid, snap_tok, snap_tok[order].contiguous(), order.to(torch.int32), snap_off)]
    gid, snap_tok, sorted_tok, snap_idx, snap_off = index
    q, k, v = (x.contiguous() if x is not None else None for x in (q, k, v))
    log_decay = log_decay.contiguous() if log_decay is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    o, snaps, final = _ChunkScan.apply(q, k, v, log_decay, initial_state, gid, snap_tok, sorted_tok, snap_idx,
                                       snap_off)
    return o, snaps, final


def scan_unsupported_reason(q, k, v, log_decay=None, initial_state=None) -> str | None:
    """None when :func:`chunk_scan` takes these tensors, else why not (then use `linear_scan`'s torch path)."""
    if k.shape[2] == 0:
        return "an empty sequence (T = 0)"
    return unsupported_reason(k, q, v, log_decay, initial_state, dims=(k.shape[-1], v.shape[-1]))
