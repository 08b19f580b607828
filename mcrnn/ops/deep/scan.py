"""The chunk-parallel scan of the deep memories: a Python loop over mini-batches only.

Inside a mini-batch every gradient is taken at the weights of its start (`W_mb`), so every update is a linear
recurrence with known coefficients. The memory stacks its state per weight in `m` blocks (`[W]` for dla,
`[W; S]` for titans) and gives the map from the blocks entering a mini-batch to the blocks after its token
`t` (:meth:`~mcrnn.ops.deep.memory.DeepMemory.transition`):

    X_t = A_t X_in − Σ_{j<=t} L_tj ∇_j          (A_t: [m, m], L_t: [m, b]; ∇_j = token j's gradient at W_mb)

The gradients are rank one (`∇W1_j = e_j a_jᵀ`, `∇W2_j = g_j k_jᵀ`, `∇W_j = e_j k_jᵀ`), so the state at
the end of a mini-batch is one rank-b matmul, and the reads are attention-like products with `R = L[:, 0]`,
`C = A[:, 0]` (the weight block), e.g. `W2_t x_t = Σ_m C_tm X2_m x_t − Σ_j R_tj (k_j·x_t) g_j`. No per-token
weights are ever built.

The loop (recurrence, reads, snapshots) is one autograd node, :class:`_Scan`, with a hand-written backward: on
CPU the work is bound by passes over the state, and the backward touches each mini-batch's state a fixed,
small number of times. Entries of the state and of its gradient below `sqrt(tiny)` are flushed to zero
(:func:`_flush`). See docs/deep_memories.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mcrnn.ops.deep.mlp import gelu, gelu_vjp, weight_keys
from mcrnn.ops.memory import State

if TYPE_CHECKING:
    from mcrnn.ops.deep.memory import DeepMemory


@dataclass
class Layout:
    """How `T` tokens fall into mini-batches.

    Mini-batch `i` holds tokens `idx[i, :length[i]]` (the rest of the row is padding, index `T`). `new[i]`: it
    starts a mini-batch (else it continues the state's one); `reset[i]`: the state restarts from `M_0` before
    it. `where[t]`: the flat slot `i * b + r` of token t. `regular`: `idx` is `arange(n * b)` cut into rows
    (then gathers are reshapes)."""

    idx: torch.Tensor
    length: list[int]
    new: list[bool]
    reset: list[bool]
    where: torch.Tensor
    regular: bool


def mini_batch_layout(
    T: int, b: int, segment_starts: Sequence[int] = (), resets: Sequence[int] = (), pos0: int = 0,
    device: torch.device | str = "cpu",
) -> Layout:
    """Mini-batches restart at every segment start; `pos0` is the position of token 0 in its segment when 0 is
    not a segment start (a call that continues a segment)."""
    reset_set = {int(r) for r in resets}
    starts = sorted({int(s) for s in segment_starts} | reset_set)
    pos = 0 if 0 in starts else int(pos0)
    edges = [s for s in starts if 0 < s < T] + [T]
    rows, length, new, reset, where = [], [], [], [], []
    t, j = 0, 0
    while t < T:
        p = pos % b
        L = min(b - p, edges[j] - t)
        where.extend(range(len(rows) * b, len(rows) * b + L))
        rows.append(list(range(t, t + L)) + [T] * (b - L))
        length.append(L)
        new.append(p == 0)
        reset.append(t in reset_set)
        t, pos = t + L, pos + L
        if t == edges[j]:
            j, pos = j + 1, 0
    n = len(rows)
    regular = all(rows[i][0] == i * b for i in range(n)) and all(L == b for L in length[:-1])
    return Layout(
        idx=torch.tensor(rows, dtype=torch.long, device=device), length=length, new=new, reset=reset,
        where=torch.tensor(where, dtype=torch.long, device=device), regular=regular,
    )


def segprod(g: torch.Tensor) -> torch.Tensor:
    """`g: [..., b]` -> `M: [..., b, b]` with `M[t, s] = Π_{s<i<=t} g_i` for `t >= s`, else 0.

    A cumprod down the columns of `X[t, s] = g_t if t > s else 1`: exact for gates that are exactly 0 (no log,
    no division), and no loop over tokens."""
    b = g.shape[-1]
    ar = torch.arange(b, device=g.device)
    strict = ar[:, None] > ar[None, :]
    X = torch.where(strict, g.unsqueeze(-1), torch.ones((), dtype=g.dtype, device=g.device))
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(strict | (ar[:, None] == ar[None, :]), X.cumprod(-2), zero)


# ----------------------------------------------------------------------------------------------------------
# one mini-batch: batch and heads flattened, `[BH, b, ·]` for tokens and `[BH, m·r, c]` for a stacked state
# ----------------------------------------------------------------------------------------------------------


def _add(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    """`x + y` where either may be None (no gradient)."""
    if x is None:
        return y
    return x if y is None else x + y


def _factors(
    memory: DeepMemory, W: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, kW: torch.Tensor | None = None
) -> dict:
    """The rank-one factors of one mini-batch's gradients at `W` (`[BH, r, c]`): `k: [BH, b, K]`, `v: [BH, b, V]`.

    Returns `e = dℓ/df` and, for the MLP, `h = W2 k`, `a = gelu(h)`, `s = gelu'(h)`, `p = W1ᵀ e` and
    `g = p ⊙ s`: `∇W1 = e aᵀ`, `∇W2 = g kᵀ` (depth 1: `∇W = e kᵀ`, with `f = W k` when the error needs it).
    `kW`: `k` times the first layer (`W2` or `W`) transposed, when the caller has it."""
    if "W" in W:
        f = None
        if memory.error_needs_forward:
            f = kW if kW is not None else torch.bmm(k, W["W"].transpose(1, 2))
        return {"e": memory.error(f, v)}
    W1, W2 = W["W1"], W["W2"]
    h = kW if kW is not None else torch.bmm(k, W2.transpose(1, 2))
    a = gelu(h)
    f = torch.baddbmm(k, a, W1.transpose(1, 2)) if memory.error_needs_forward else None
    e = memory.error(f, v)
    p = torch.bmm(e, W1)
    slope = gelu_vjp(torch.ones_like(h), h)
    return {"h": h, "a": a, "s": slope, "e": e, "p": p, "g": p * slope}


def _rank_one(fac: dict, k: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weight, the factors of its gradients `∇_j = left_j right_jᵀ` (`[BH, b, r]`, `[BH, b, c]`)."""
    return {"W": (fac["e"], k)} if "a" not in fac else {"W1": (fac["e"], fac["a"]), "W2": (fac["g"], k)}


def _gelu_second(h: torch.Tensor) -> torch.Tensor:
    """`gelu''(h) = φ(h) (2 − h²)` for the exact GELU (φ the standard normal density)."""
    h2 = h * h
    return torch.exp(-0.5 * h2).mul_(2.0 - h2).mul_((2.0 * torch.pi) ** -0.5)


def _add_outer(dW: dict, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """`dW[name] += xᵀ y` (`x: [BH, b, r]`, `y: [BH, b, c]`); a missing entry (None) starts at zero."""
    if dW[name] is None:
        dW[name] = torch.bmm(x.transpose(1, 2), y)
    else:
        dW[name].baddbmm_(x.transpose(1, 2), y)


def _factors_backward(
    memory: DeepMemory, W: dict[str, torch.Tensor], k: torch.Tensor, fac: dict, dfac: dict,
    dW: dict[str, torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Backward of :func:`_factors` from `dfac` (`{"e", "a", "g"}`, entries may be None): returns `(dk, dv)` and
    adds the weights' gradients into `dW` (entries may be None: no gradient yet; they stay None when the
    factors do not depend on that weight, as dla's at depth 1)."""
    de = dfac["e"] if dfac["e"] is not None else torch.zeros_like(fac["e"])
    dk = None
    if "W" in W:
        df, dv = memory.error_vjp(de)
        if df is not None:
            dk = torch.bmm(df, W["W"])
            _add_outer(dW, "W", df, k)
        return dk, dv
    W1, W2 = W["W1"], W["W2"]
    h, a, slope, e, p = fac["h"], fac["a"], fac["s"], fac["e"], fac["p"]
    da, dg = dfac["a"], dfac["g"]
    dh = None
    if dg is not None:  # g = p ⊙ gelu'(h), p = W1ᵀ e
        dp = dg * slope
        dh = _gelu_second(h).mul_(p).mul_(dg)
        de = torch.baddbmm(de, dp, W1.transpose(1, 2))
        _add_outer(dW, "W1", e, dp)
    df, dv = memory.error_vjp(de)
    if df is not None:  # f = k + W1 a
        dk = df
        da = torch.baddbmm(da, df, W1) if da is not None else torch.bmm(df, W1)
        _add_outer(dW, "W1", df, a)
    if da is not None:  # a = gelu(h)
        dh = torch.addcmul(dh, da, slope) if dh is not None else da * slope
    if dh is not None:  # h = W2 k
        dk = torch.baddbmm(dk, dh, W2) if dk is not None else torch.bmm(dh, W2)
        _add_outer(dW, "W2", dh, k)
    return dk, dv


def _scaled_left(L: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """`lw[j, p, r] = L_pj left_j[r]`: `L: [BH, p, b]`, `left: [BH, b, r]` -> `[BH, b, p·r]` (contiguous)."""
    return (L.transpose(1, 2).unsqueeze(-1) * left.unsqueeze(2)).flatten(2)


def _advance(X: torch.Tensor, left: torch.Tensor, right: torch.Tensor, A: torch.Tensor, L: torch.Tensor):
    """`out_p = Σ_m A_pm X_m − Σ_j L_pj left_j right_jᵀ` for the `m` stacked blocks (`X: [BH, m·r, c]`,
    `A: [BH, p, m]`, `L: [BH, p, b]`, out `[BH, p·r, c]`): one block-mix `bmm` and one rank-b `baddbmm`."""
    BH, _, m = A.shape
    out = torch.bmm(A, X.view(BH, m, -1)).view(BH, -1, X.shape[-1])
    out.baddbmm_(_scaled_left(L, left).transpose(1, 2), right, alpha=-1.0)
    return _flush(out)


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the entries of a carried state (or of its gradient) below `sqrt(tiny)` of the dtype
    (1.1e-19 in float32, 1.5e-154 in float64), so that no product of two of them is subnormal.

    A memory that forgets decays towards zero, and so does the gradient flowing back to early mini-batches;
    on x86 every operation on subnormal floats takes a microcode assist, ~50-100x slower (one such run took
    68 s instead of 1.5 s). Flush-to-zero is a per-thread CPU mode that the worker threads of an op do not
    share, so the scan flushes the two chains itself. In float32 an entry below 1e-19 is 1e-12 times smaller
    than float32's resolution of any O(1) quantity it is added to; the backward normalises its incoming
    gradients to O(1) first (see `_Scan.backward`), so this holds for gradients of any scale."""
    return torch.hardshrink(x, math.sqrt(torch.finfo(x.dtype).tiny), out=x)


def _advance_backward(dout: torch.Tensor, X: torch.Tensor, left, right, A: torch.Tensor, L: torch.Tensor):
    """Backward of :func:`_advance`: `(dX, d left, d right, dA, dL)`."""
    BH, p, m = A.shape
    b = L.shape[-1]
    dX = torch.bmm(A.transpose(1, 2), dout.view(BH, p, -1)).view_as(X)
    dA = torch.bmm(dout.view(BH, p, -1), X.view(BH, m, -1).transpose(1, 2))
    d_right = torch.bmm(_scaled_left(L, left), dout).neg_()
    d_lw = torch.bmm(dout, right.transpose(1, 2)).neg_().view(BH, p, -1, b)  # [BH, p, r, b]
    d_left = (d_lw * L.unsqueeze(2)).sum(1).transpose(1, 2)
    dL = (d_lw * left.transpose(1, 2).unsqueeze(1)).sum(2)
    return dX, d_left, d_right, dA, dL


def _apply(X, C, y, R, rows, vecs, yX=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`W_t y_t = Σ_m C_tm X_m y_t − Σ_j R_tj (rows_j · y_t) vecs_j` for the tokens of one mini-batch (the
    weights' gradients are `vecs_j rows_jᵀ`), without building `W_t`: `X: [BH, m·r, c]`, `C: [BH, b, m]`,
    `y: [BH, b, c]`. `yX = y Xᵀ: [BH, b, m·r]` (every block at once) when the caller has it. Returns the result,
    `yX` and `G = y rowsᵀ: [BH, b, b]` (what the backward needs)."""
    if yX is None:
        yX = torch.bmm(y, X.transpose(1, 2))
    m = C.shape[-1]
    out = yX * C if m == 1 else (yX.unflatten(-1, (m, -1)) * C.unsqueeze(-1)).sum(-2)
    G = torch.bmm(y, rows.transpose(1, 2))
    return torch.baddbmm(out, R * G, vecs, alpha=-1.0), yX, G


def _apply_backward(dout, X, C, y, R, rows, vecs, yX, G, dX):
    """Backward of :func:`_apply`: adds into `dX` in place, returns `(dy, dC, dR, d rows, d vecs)`."""
    BH, b, m = C.shape
    if m == 1:
        dC = (yX * dout).sum(-1, keepdim=True)
        dyX = C * dout
    else:
        dC = (yX.view(BH, b, m, -1) * dout.unsqueeze(2)).sum(-1)
        dyX = (C.unsqueeze(-1) * dout.unsqueeze(2)).view(BH, b, -1)
    dy = torch.bmm(dyX, X)
    dX.baddbmm_(dyX.transpose(1, 2), y)
    d_vecs = torch.bmm((R * G).transpose(1, 2), dout).neg_()
    dRG = torch.bmm(dout, vecs.transpose(1, 2)).neg_()
    dG = dRG * R
    dy.baddbmm_(dG, rows)
    return dy, dC, dRG * G, torch.bmm(dG.transpose(1, 2), y), d_vecs


# ----------------------------------------------------------------------------------------------------------
# the scan over mini-batches: one autograd node with a hand-written backward
# ----------------------------------------------------------------------------------------------------------


#: keep every mini-batch's entering state for the backward up to this size (else keep every ~sqrt(n)-th and
#: recompute the others): above it memory, below it the recomputation (two passes over the state) costs more
_KEEP_ALL_BYTES = 256 * 2**20


@dataclass
class _Plan:
    """What the mini-batch loop needs besides tensors. `fresh[i]`: mini-batch i's gradient point is its entering
    weights (else it continues the previous one's); `reset[i]`: its entering state is `M_0`; `snap_at[i]`: the
    snapshots taken inside it (indices into the snapshot list); `reads`/`mix`: outputs are read (with Memory
    Soup's mix)."""

    memory: DeepMemory
    wk: tuple[str, ...]
    fresh: list[bool]
    reset: list[bool]
    snap_at: dict[int, list[int]]
    n_snaps: int
    reads: bool
    mix: bool


class _Scan(torch.autograd.Function):
    """The whole mini-batch loop of a deep memory: the recurrence, the reads and the snapshots.

    Inputs (mini-batch-major, batch and heads flattened): `k: [n, BH, b, K]`, `v: [n, BH, b, V]`, the map over
    each whole mini-batch `A: [n, BH, m, m]`, `L: [n, BH, m, b]`; for reads `x: [n, BH, b, K]` (scaled queries)
    and the in-mini-batch coefficients `C: [n, BH, b, m]`, `R: [n, BH, b, b]`; for Memory Soup `γ: [n, BH, b, 1]`
    and the cached hidden part `hc: [n, BH, b, E]`; for snapshots their rows of the map `As: [S, BH, 1, m]`,
    `Ls: [S, BH, 1, b]`; then per weight the stacked initial state, the initial gradient point and, when some
    mini-batch restarts, the stacked `M_0`. Outputs: per weight the stacked final state and the final gradient
    point; for reads `y = W_t x_t` (depth 1) or `W1_t z_t`, `z = gelu(W2_t x_t)` or, mixed, `gelu(γ W2_t x_t + hc)`
    (`[n, BH, b, ·]`), then `z` when mixing; per weight the snapshots `[S, BH, r, c]`.

    The backward runs the mini-batches in reverse from the saved entering states (all of them up to
    `_KEEP_ALL_BYTES`, else every ~sqrt(n)-th and the others recomputed per segment) and the small
    per-mini-batch factors: a short fixed list of batched products per mini-batch on tensors of one mini-batch,
    instead of autograd's graph of ~60 nodes per mini-batch."""

    @staticmethod
    def forward(ctx, plan: _Plan, k, v, A, L, x, C, R, gamma, hc, As, Ls, *states):
        memory, wk = plan.memory, plan.wk
        nw = len(wk)
        X, Wmb, X0 = list(states[:nw]), list(states[nw : 2 * nw]), states[2 * nw :]
        n = k.shape[0]
        rows = [W.shape[-2] for W in Wmb]
        # Every entering state is kept for the backward while they fit in `_KEEP_ALL_BYTES`; beyond, only every
        # `every`-th (the others are recomputed from it in the backward, one segment at a time), so that memory
        # stays O((n / every + every) · state) instead of O(n · state).
        state_bytes = sum(x_.numel() * x_.element_size() for x_ in X)
        every = 1 if n * state_bytes <= _KEEP_ALL_BYTES else max(1, math.isqrt(n))
        merge = memory.error_needs_forward or "W1" in wk  # the factors need k through the first layer
        b = k.shape[2]
        checkpoints, carried = {}, {}
        facs, reads, y_out, z_out = [], [], [], []
        snaps = [[None] * plan.n_snaps for _ in range(nw)]
        for i in range(n):
            if plan.reset[i]:
                X = list(X0)
            if i % every == 0:
                checkpoints[i] = X
            if plan.fresh[i]:
                Wmb = [X[w][:, : rows[w]] for w in range(nw)]
            else:
                carried[i] = Wmb
            kW = xX = None
            if plan.reads and plan.fresh[i] and merge:  # keys and queries through the first layer in one product
                kxX = torch.bmm(torch.cat([k[i], x[i]], dim=1), X[-1].transpose(1, 2))  # [BH, 2b, m·r]
                kW, xX = kxX[:, :b, : rows[-1]], kxX[:, b:]
            fac = _factors(memory, dict(zip(wk, Wmb, strict=True)), k[i], v[i], kW)
            facs.append(fac)
            if plan.reads:
                if "W" in wk:
                    y, xX, G = _apply(X[0], C[i], x[i], R[i], k[i], fac["e"], xX)
                    reads.append({"xX": xX, "G": G})
                else:
                    h, xX, G2 = _apply(X[1], C[i], x[i], R[i], k[i], fac["g"], xX)
                    pre = torch.addcmul(hc[i], gamma[i], h) if plan.mix else h
                    z = gelu(pre)
                    y, zX, G1 = _apply(X[0], C[i], z, R[i], fac["a"], fac["e"])
                    reads.append({"h": h, "pre": pre, "z": z, "xX": xX, "zX": zX, "G2": G2, "G1": G1})
                    z_out.append(z)
                y_out.append(y)
            pairs = _rank_one(fac, k[i])
            for s in plan.snap_at.get(i, ()):
                for w, nm in enumerate(wk):
                    snaps[w][s] = _advance(X[w], *pairs[nm], As[s], Ls[s])
            if i + 1 < n and plan.reset[i + 1]:
                continue  # the state is dropped: the next mini-batch starts from M_0
            X = [_advance(X[w], *pairs[nm], A[i], L[i]) for w, nm in enumerate(wk)]
        ctx.plan, ctx.every, ctx.checkpoints, ctx.carried, ctx.facs, ctx.reads = (
            plan, every, checkpoints, carried, facs, reads)
        ctx.rows, ctx.n_states = rows, len(states)
        ctx.save_for_backward(k, v, A, L, x, C, R, gamma, hc, As, Ls, *states[2 * nw :])
        ctx.set_materialize_grads(False)
        out = [*X, *[w.clone() for w in Wmb]]
        if plan.reads:
            out.append(torch.stack(y_out))
            if plan.mix:
                out.append(torch.stack(z_out))
        if plan.n_snaps:
            out += [torch.stack(s) for s in snaps]
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        plan, facs, reads, rows = ctx.plan, ctx.facs, ctx.reads, ctx.rows
        memory, wk = plan.memory, plan.wk
        nw = len(wk)
        k, v, A, L, x, C, R, gamma, hc, As, Ls, *X0 = ctx.saved_tensors
        d_out, d_mb = list(grads[:nw]), list(grads[nw : 2 * nw])
        pos = 2 * nw
        dy_all = dz_all = None
        if plan.reads:
            dy_all, pos = grads[pos], pos + 1
            if plan.mix:
                dz_all, pos = grads[pos], pos + 1
        d_snaps = grads[pos : pos + nw] if plan.n_snaps else [None] * nw
        # The backward is linear in the incoming gradients: run it on them divided by a power of two near their
        # largest entry (exact), so that `_flush` is relative to the gradients' scale, and scale back at the end.
        scale = _power_of_two_scale([*d_out, *d_mb, dy_all, dz_all, *d_snaps])
        if scale != 1.0:
            unit = lambda t: t * (1.0 / scale) if t is not None else None  # noqa: E731
            d_out, d_mb, d_snaps = [unit(t) for t in d_out], [unit(t) for t in d_mb], [unit(t) for t in d_snaps]
            dy_all, dz_all = unit(dy_all), unit(dz_all)
        zeros = lambda t, on=True: torch.zeros_like(t) if on and t is not None else None  # noqa: E731
        dk, dv, dA, dL = zeros(k), zeros(v), zeros(A), zeros(L)
        dx, dC, dR = zeros(x, plan.reads), zeros(C, plan.reads), zeros(R, plan.reads)
        dgamma, dhc = zeros(gamma, plan.mix), zeros(hc, plan.mix)
        dAs, dLs = zeros(As), zeros(Ls)
        dX0 = [None] * (ctx.n_states - 2 * nw)
        dX_init = [None] * nw
        n = k.shape[0]
        entering: dict[int, list[torch.Tensor]] = {}
        for i in reversed(range(n)):
            if i not in entering:  # recompute the states entering this segment of mini-batches
                start = i - i % ctx.every
                entering = {start: ctx.checkpoints[start]}
                for j in range(start, i):
                    if plan.reset[j + 1]:
                        entering[j + 1] = list(X0)
                    else:
                        pairs = _rank_one(facs[j], k[j])
                        entering[j + 1] = [_advance(entering[j][w], *pairs[nm], A[j], L[j]) for w, nm in enumerate(wk)]
            X, fac = entering.pop(i), facs[i]
            g = _MiniBatchGrads(wk, X, _rank_one(fac, k[i]))
            dropped = i + 1 < n and plan.reset[i + 1]
            for w in range(nw):
                if not dropped and d_out[w] is not None:
                    dA_, dL_ = g.advance(w, d_out[w], A[i], L[i])
                    dA[i] += dA_
                    dL[i] += dL_
                if d_snaps[w] is not None:
                    for s in plan.snap_at.get(i, ()):
                        dA_, dL_ = g.advance(w, d_snaps[w][s], As[s], Ls[s])
                        dAs[s] += dA_
                        dLs[s] += dL_
            if plan.reads and dy_all is not None:
                dS = [g.dX[w] if g.dX[w] is not None else torch.zeros_like(X[w]) for w in range(nw)]
                g.dX = dS
                if "W" in wk:
                    dx[i], dC[i], dR[i], dki, dei = _apply_backward(
                        dy_all[i], X[0], C[i], x[i], R[i], k[i], fac["e"], reads[i]["xX"], reads[i]["G"], dS[0])
                    g.add("e", dei)
                else:
                    rd = reads[i]
                    dz, dC1, dR1, dai, dei = _apply_backward(
                        dy_all[i], X[0], C[i], rd["z"], R[i], fac["a"], fac["e"], rd["zX"], rd["G1"], dS[0])
                    g.add("a", dai)
                    g.add("e", dei)
                    if dz_all is not None:
                        dz = dz + dz_all[i]
                    dpre = gelu_vjp(dz, rd["pre"])
                    if plan.mix:
                        dgamma[i] = (dpre * rd["h"]).sum(-1, keepdim=True)
                        dhc[i] = dpre
                        dpre = dpre * gamma[i]
                    dx[i], dC2, dR2, dki, dgi = _apply_backward(
                        dpre, X[1], C[i], x[i], R[i], k[i], fac["g"], rd["xX"], rd["G2"], dS[1])
                    g.add("g", dgi)
                    dC[i], dR[i] = dC1 + dC2, dR1 + dR2
                g.add("k", dki)
            # the factors, at the mini-batch's gradient point
            if plan.fresh[i]:  # the gradient point is the entering weights: accumulate into their gradient
                Wmb = [X[w][:, : rows[w]] for w in range(nw)]
                g.dX = [d if d is not None else torch.zeros_like(X[w]) for w, d in enumerate(g.dX)]
                dW = {nm: g.dX[w][:, : rows[w]] for w, nm in enumerate(wk)}
                for w, nm in enumerate(wk):  # the gradient point leaving the last mini-batch (the final `*_mb`)
                    if d_mb[w] is not None:
                        dW[nm] += d_mb[w]
            else:
                Wmb = ctx.carried[i]
                dW = {nm: (d.clone() if d is not None else None) for nm, d in zip(wk, d_mb, strict=True)}
            dk_f, dv[i] = _factors_backward(memory, dict(zip(wk, Wmb, strict=True)), k[i], fac, g.dfac, dW)
            g.add("k", dk_f)
            if g.dfac["k"] is not None:
                dk[i] = g.dfac["k"]
            d_mb = [None] * nw if plan.fresh[i] else [dW[nm] for nm in wk]
            g.dX = [_flush(d) if d is not None else None for d in g.dX]
            if plan.reset[i]:
                dX0 = [_add(a, b) for a, b in zip(dX0, g.dX, strict=True)]
                d_out = [None] * nw
            elif i == 0:
                dX_init = g.dX
            else:
                d_out = g.dX
        d_Wmb_init = d_mb if not plan.fresh[0] else [None] * nw
        out = (dk, dv, dA, dL, dx, dC, dR, dgamma, dhc, dAs, dLs, *dX_init, *d_Wmb_init, *dX0)
        if scale != 1.0:
            out = tuple(t.mul_(scale) if t is not None else None for t in out)
        return (None, *out)


def _power_of_two_scale(grads: list[torch.Tensor | None]) -> float:
    """`2^floor(log2(max |g|))` over the given gradients; 1 when they are all zero (or not finite)."""
    peak = max((float(t.abs().amax()) for t in grads if t is not None and t.numel()), default=0.0)
    if not 0.0 < peak < math.inf:
        return 1.0
    return 2.0 ** math.floor(math.log2(peak))


class _MiniBatchGrads:
    """Accumulates one mini-batch's gradients in the backward: on its entering state (`dX`, per weight) and on its
    factors and keys (`dfac`: `e`, `a`, `g`, `k`; None until something arrives)."""

    def __init__(self, wk, X, pairs):
        self.wk, self.X, self.pairs = wk, X, pairs
        self.dX = [None] * len(wk)
        self.dfac = {"e": None, "a": None, "g": None, "k": None}

    def add(self, name: str, grad: torch.Tensor | None) -> None:
        self.dfac[name] = _add(self.dfac[name], grad)

    def advance(self, w: int, dout: torch.Tensor, A: torch.Tensor, L: torch.Tensor):
        """Backward of one :func:`_advance` of weight `w`; returns `(dA, dL)`."""
        nm = self.wk[w]
        dX, d_left, d_right, dA, dL = _advance_backward(dout, self.X[w], *self.pairs[nm], A, L)
        self.dX[w] = _add(self.dX[w], dX)
        self.add("g" if nm == "W2" else "e", d_left)  # ∇W2 = g kᵀ, ∇W1 = e aᵀ, ∇W = e kᵀ
        self.add("a" if nm == "W1" else "k", d_right)
        return dA, dL


# ----------------------------------------------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------------------------------------------


def deep_scan(
    memory: DeepMemory, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor], *,
    params: dict[str, torch.Tensor], initial: State, layout: Layout, positions: Sequence[int] = (),
    scale: float = 1.0, mix=None,
) -> tuple[torch.Tensor | None, State | None, State]:
    """Chunk-parallel deep memory over `T` tokens (heads-first, compute dtype).

    `q, k: [B, H, T, K]`, `v: [B, H, T, V]`, every gate of the memory `[B, H, T]`; `params` `[H, ...]` (the
    `M_0` of resets); `initial` a full state (:meth:`~mcrnn.ops.deep.memory.DeepMemory.state_keys`). `mix`:
    Memory Soup's hook (:class:`~mcrnn.ops.deep.memory.SoupMix`). Python loops over mini-batches only.
    Returns `o: [B, H, T, V]` (None without `q`), the current weights after token `e - 1` for each `e` in
    `positions` (`{name: [B, H, len(positions), ...]}`, None when empty) and the final state.
    """
    B, H, T, K = k.shape
    n, b = layout.idx.shape
    BH = B * H
    dt = k.dtype
    wk = weight_keys(params)

    def to_mb(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, *D] -> [n, BH, b, *D], zero padding
        x = x.reshape(BH, T, *x.shape[3:])
        if layout.regular:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, n * b - T)).view(BH, n, b, *x.shape[2:])
        else:
            x = torch.cat([x, x.new_zeros(BH, 1, *x.shape[2:])], dim=1)[:, layout.idx]
        return x.transpose(0, 1).contiguous()

    def from_mb(y: torch.Tensor) -> torch.Tensor:  # [n, BH, b, D] -> [B, H, T, D]
        y = y.transpose(0, 1).reshape(BH, n * b, -1)
        y = y[:, :T] if layout.regular else y[:, layout.where]
        return y.reshape(B, H, T, -1)

    kc, vc = to_mb(k), to_mb(v)
    # The in-mini-batch maps (padding sits after each row's last real token, so by causality it never reaches a
    # real one): `C = A[..., 0, :]` are the coefficients of the entering blocks in W_t, `R = L[..., 0, :]` those
    # of the gradients.
    A, L = memory.transition({nm: to_mb(g) for nm, g in gates.items()})  # [n, BH, b, m, m], [n, BH, b, m, b]
    last = torch.tensor(layout.length, device=k.device) - 1
    ar = torch.arange(n, device=k.device)
    A_end, L_end = A[ar, :, last], L[ar, :, last]  # [n, BH, m, m], [n, BH, m, b]

    def stacked(st: State) -> list[torch.Tensor]:
        return [torch.cat([st[key] for key in memory.blocks(nm)], dim=-2).reshape(BH, -1, st[nm].shape[-1])
                for nm in wk]

    x = C = R = gamma = hc = As = Ls = None
    if q is not None:
        x, C, R = to_mb(q) * scale, A[..., 0, :], L[..., 0, :]
        if mix is not None:
            gamma, hc = to_mb(mix.gamma_on), to_mb(mix.hidden_cached)
    snap_at: dict[int, list[int]] = {}
    if len(positions):
        flat = layout.where[torch.as_tensor(list(positions), dtype=torch.long, device=k.device) - 1]
        i_s, r_s = flat // b, flat % b
        As, Ls = A[i_s, :, r_s, :1], L[i_s, :, r_s, :1]  # [S, BH, 1, m], [S, BH, 1, b]
        for s, i in enumerate(i_s.tolist()):
            snap_at.setdefault(i, []).append(s)
    M0 = {nm: params[nm].to(dt).unsqueeze(0).expand(B, *params[nm].shape) for nm in wk}
    plan = _Plan(
        memory=memory, wk=wk, fresh=[bool(x_) or bool(r) for x_, r in zip(layout.new, layout.reset, strict=True)],
        reset=list(layout.reset), snap_at=snap_at, n_snaps=len(positions), reads=q is not None, mix=mix is not None,
    )
    inputs = [kc, vc, A_end, L_end, x, C, R, gamma, hc, As, Ls, *stacked(initial),
              *[initial[nm + "_mb"].reshape(BH, *initial[nm].shape[2:]) for nm in wk],
              *(stacked(memory.with_extras(M0)) if any(layout.reset) else ())]
    out = _Scan.apply(plan, *inputs)
    nw = len(wk)
    final = {}
    for w, nm in enumerate(wk):
        r, c = M0[nm].shape[-2:]
        final.update(zip(memory.blocks(nm), out[w].view(B, H, -1, c).split(r, dim=-2), strict=True))
        final[nm + "_mb"] = out[nw + w].view(B, H, r, c)  # what `step` keeps
    pos = 2 * nw
    o = None
    if q is not None:
        y = out[pos]
        if "W" in wk or mix is None:
            o = from_mb(y if "W" in wk else x + y)
        else:  # Memory Soup: the online W1_t z_t is mixed with the cached weights (`SoupMix`)
            o = mix.output(from_mb(x), from_mb(out[pos + 1]), from_mb(y))
        pos += 1 + (mix is not None)
    snaps = None
    if len(positions):
        snaps = {nm: out[pos + w].view(len(positions), B, H, *M0[nm].shape[-2:]).permute(1, 2, 0, 3, 4).contiguous()
                 for w, nm in enumerate(wk)}
    return o, snaps, final
