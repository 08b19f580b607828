"""The chunk-parallel scan of the deep memories: a Python loop over mini-batches only.

Inside a mini-batch every gradient is taken at the weights of its start (`W_mb`), so every update is a linear
recurrence with known coefficients. The memory stacks its state per weight in `m` blocks (`[W]` for dla,
`[W; S]` for titans) and gives the map from the blocks entering a mini-batch to the blocks after its token
`t` (:meth:`~mcrnn.ops.deep.memory.DeepMemory.transition`):

    X_t = A_t X_in − Σ_{j<=t} L_tj ∇_j          (A_t: [m, m], L_t: [m, b]; ∇_j = token j's gradient at W_mb)

The gradients are rank one (`∇W1_j = e_j a_jᵀ`, `∇W2_j = g_j k_jᵀ`, `∇W_j = e_j k_jᵀ`), so the state at
the end of a mini-batch is one rank-b matmul, and the reads are attention-like products with `R = L[:, 0]`,
`C = A[:, 0]` (the weight block), e.g. `W2_t x_t = Σ_m C_tm X2_m x_t − Σ_j R_tj (k_j·x_t) g_j`. No per-token
weights are ever built. See docs/deep_memories.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

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


def _pairs(f: dict[str, torch.Tensor], k: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weight, the two factors of its rank-one gradients: `∇_j = left_j right_jᵀ`."""
    return {"W": (f["e"], k)} if "a" not in f else {"W1": (f["e"], f["a"]), "W2": (f["g"], k)}


def _advance(
    X: dict[str, torch.Tensor], f: dict[str, torch.Tensor], k: torch.Tensor, A: torch.Tensor, L: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Linear map of a stacked state plus rank-b gradient terms, per weight.

    `X[name]: [B, H, m·r, c]` holds `m` blocks (dla: `W`; titans: `W` over the momentum `S`),
    `A: [B, H, p, m]`, `L: [B, H, p, b]`. Block `i` of the result (`[B, H, p·r, c]`) is
    `Σ_m A_im X_m - Σ_j L_ij ∇_j`. The block mix is one small `bmm` over the whole state and the gradient
    terms one `baddbmm`: two passes over the state per weight (state-sized passes dominate the CPU time)."""
    out = {}
    B, H, p, m = A.shape
    b = L.shape[-1]
    for nm, (left, right) in _pairs(f, k).items():
        x = X[nm]
        r, c = x.shape[-2] // m, x.shape[-1]
        base = (A.reshape(B * H, p, m) @ x.reshape(B * H, m, r * c)).view(B * H, p * r, c)
        lw = (L.unsqueeze(-1) * left.unsqueeze(-3)).transpose(-2, -3)  # [B, H, b, p, r]
        out[nm] = torch.baddbmm(
            base, lw.reshape(B * H, b, p * r).transpose(-1, -2), right.reshape(B * H, b, c), alpha=-1.0
        ).view(B, H, p * r, c)
    return out


def _read_mini_batch(
    X: dict[str, torch.Tensor], f: dict[str, torch.Tensor], x: torch.Tensor, R: torch.Tensor,
    RKX: torch.Tensor, C: torch.Tensor, xX: torch.Tensor | None, mix=None, rows: int | None = None,
) -> torch.Tensor:
    """`o_t = f_{W_t}(x_t)` for the `b` tokens of one mini-batch without building `W_t`.

    `X` the stacked state entering it (see :func:`_advance`), `x: [B, H, b, K]`, `R: [B, H, b, b]`,
    `RKX = R ⊙ (x kᵀ)`, `C: [B, H, b, m]` the coefficients of the blocks in `W_t`, `xX`: `x` times the stacked
    first layer transposed when already computed. `mix` (Memory Soup) gets the online hidden `W2_t x_t` of the
    tokens `rows` and returns the mixed `gelu(h)`, then combines the online `W1_t gelu(h)` with the caches."""
    B, H, b, m = C.shape

    def apply(name: str, y: torch.Tensor, RY: torch.Tensor, vecs: torch.Tensor, yX=None) -> torch.Tensor:
        # W_t y_t = Σ_m C_tm X_m y_t - Σ_j R_tj (rows_j · y_t) vecs_j   (∇_j = vecs_j rows_jᵀ,
        # RY = R ⊙ (y rowsᵀ))
        yX = y @ X[name].transpose(-1, -2) if yX is None else yX  # [B, H, b, m·r]: every block in one matmul
        out = yX * C if m == 1 else (yX.unflatten(-1, (m, -1)) * C.unsqueeze(-1)).sum(-2)
        out = torch.baddbmm(out.flatten(0, 1), RY.flatten(0, 1), vecs.flatten(0, 1), alpha=-1.0)
        return out.view(B, H, b, -1)

    if "W" in X:
        return apply("W", x, RKX, f["e"], xX)
    h = apply("W2", x, RKX, f["g"], xX)
    if mix is None:
        u = gelu(h)
        return x + apply("W1", u, R * (u @ f["a"].transpose(-1, -2)), f["e"])
    # Memory Soup: the online W2_t, W1_t are mixed with the cached weights by the caller (`SoupMix`)
    z = mix.hidden(rows, h)  # `rows`: the mini-batch's index
    return mix.output(rows, x, z, apply("W1", z, R * (z @ f["a"].transpose(-1, -2)), f["e"]))


def grad_factors(
    memory: DeepMemory, W: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, kW: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The rank-one factors of a mini-batch's gradients, all at the weights `W` (leading dims `[*L]`).

    `k: [*L, n, K]`, `v: [*L, n, V]`; `kW`: `k` times the first layer (`W2` or `W`) transposed, when the
    caller already has it. Returns `e = dℓ/df: [*L, n, V]` and, for the MLP, `a = gelu(W2 k)` and
    `g = (W1ᵀ e) ⊙ gelu'(W2 k)`, both `[*L, n, E]`: then `∇W1 = e aᵀ`, `∇W2 = g kᵀ` (depth 1: `∇W = e kᵀ`).
    """
    first = W["W"] if "W" in W else W["W2"]
    if kW is None and (memory.error_needs_forward or "W" not in W):
        kW = k @ first.transpose(-1, -2)
    if "W" in W:
        return {"e": memory.error(kW, v)}
    W1 = W["W1"]
    a = gelu(kW)
    f = k + a @ W1.transpose(-1, -2) if memory.error_needs_forward else None
    e = memory.error(f, v)
    return {"e": e, "a": a, "g": gelu_vjp(e @ W1, kW)}


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
    dt = k.dtype
    wk = weight_keys(params)

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, *D] -> [B, H, n, b, *D], zero padding
        if layout.regular:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, n * b - T))
            return x.reshape(B, H, n, b, *x.shape[3:])
        x = torch.cat([x, x.new_zeros(B, H, 1, *x.shape[3:])], dim=2)
        return x[:, :, layout.idx]

    kc, vc = gather(k), gather(v)
    # The in-mini-batch maps (padding sits after each row's last real token, so by causality it never reaches a
    # real one): `C = A[..., 0, :]` are the coefficients of the entering blocks in W_t, `R = L[..., 0, :]` those
    # of the gradients.
    A, L = memory.transition({nm: gather(g) for nm, g in gates.items()})  # [B, H, n, b, m, m], [B, H, n, b, m, b]
    C, R = A[..., 0, :], L[..., 0, :]

    # End of each mini-batch (row of its last real token).
    last = torch.tensor(layout.length, device=k.device) - 1
    ar = torch.arange(n, device=k.device)
    A_end, L_end = A[:, :, ar, last], L[:, :, ar, last]  # [B, H, n, m, m], [B, H, n, m, b]

    # Unbind once: indexing `x[:, :, i]` in the loop would make autograd allocate a full-size zero gradient
    # per mini-batch (select_backward), O(n^2) memory traffic in the backward.
    k_i, v_i, A_i, L_i = kc.unbind(2), vc.unbind(2), A_end.unbind(2), L_end.unbind(2)
    # the gradients need k through the first layer: share the matmul with q
    merge = memory.error_needs_forward or "W1" in wk
    if q is not None:
        xc = gather(q) * scale
        RKX_i = (R * (xc @ kc.transpose(-1, -2))).unbind(2)  # state-independent: one batched product
        R_i, C_i, x_i = R.unbind(2), C.unbind(2), xc.unbind(2)
        kx_i = torch.cat([kc, xc], dim=-2).unbind(2) if merge else None
    snap_at: dict[int, list[tuple[int, int]]] = {}  # mini-batch -> [(slot in the output, row)]
    if len(positions):
        flat = layout.where[torch.as_tensor(list(positions), dtype=torch.long, device=k.device) - 1].tolist()
        for e, fl in enumerate(flat):
            snap_at.setdefault(fl // b, []).append((e, fl % b))

    def stacked(st: State) -> dict[str, torch.Tensor]:
        return {nm: torch.cat([st[key] for key in memory.blocks(nm)], dim=-2) for nm in wk}

    M0 = {nm: params[nm].to(dt).unsqueeze(0).expand(B, *params[nm].shape) for nm in wk}
    X0 = stacked(memory.with_extras(M0))
    rows = {nm: M0[nm].shape[-2] for nm in wk}

    def w_block(X: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {nm: X[nm][..., : rows[nm], :] for nm in wk}

    X = stacked(initial)
    Wmb, mb_is_in = {nm: initial[nm + "_mb"] for nm in wk}, False
    outs, snap_list = [], [None] * len(positions)
    if mix is not None:
        mix.prepare(layout.idx)
    for i in range(n):
        if layout.reset[i]:
            X, mb_is_in = X0, True
        elif layout.new[i]:
            mb_is_in = True
        if mb_is_in:
            Wmb = w_block(X)
        kW = xX = None
        if q is not None and merge and mb_is_in:
            first = wk[-1]  # "W2" or "W"
            kxX = kx_i[i] @ X[first].transpose(-1, -2)  # [B, H, 2b, m·r]
            kW, xX = kxX[..., :b, : rows[first]], kxX[..., b:, :]
        f = grad_factors(memory, Wmb, k_i[i], v_i[i], kW)
        if q is not None:
            outs.append(_read_mini_batch(X, f, x_i[i], R_i[i], RKX_i[i], C_i[i], xX, mix, i))
        for e, r in snap_at.get(i, ()):
            snap_list[e] = _advance(X, f, k_i[i], A[:, :, i, r, :1], L[:, :, i, r, :1])
        X = _advance(X, f, k_i[i], A_i[i], L_i[i])
        mb_is_in = False
    final = {}
    for nm in wk:
        parts = X[nm].split(rows[nm], dim=-2)
        final.update(zip(memory.blocks(nm), parts))
        final[nm + "_mb"] = Wmb[nm]  # the start of the last token's mini-batch (what `step` keeps)

    o = None
    if q is not None:
        o = torch.stack(outs, dim=2).reshape(B, H, n * b, -1)
        o = o[:, :, :T] if layout.regular else o[:, :, layout.where]
    snaps = None
    if len(positions):
        snaps = {nm: torch.stack([sn[nm] for sn in snap_list], dim=2) for nm in wk}
    return o, snaps, final
