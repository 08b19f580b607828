"""Deep memories (SPEC §1): the MLP math shared by `dla` and `titans`, their chunk-parallel scan, the
one-token step, and the two :class:`~mcrnn.ops.memories.Memory` subclasses that Memory Caching uses.

Per head the memory is an MLP `f_W(x) = x + W1 gelu(W2 x)` (`W1: [V, E]`, `W2: [E, K]`, `K == V`) or, depth 1,
`f_W(x) = W x` (`W: [V, K]`), trained online by one gradient step per token:

- `dla`:    `W_t = a_t W_{t-1} - θ_t ∇ℓ_t`, `ℓ_t = -<f_W(k_t), v_t>` (gates `lr` = θ, `decay` = a);
- `titans`: `S_t = η_t S_{t-1} - θ_t ∇ℓ_t`, `W_t = (1 - α_t) W_{t-1} + S_t`, `ℓ_t = ½‖f_W(k_t) - v_t‖²`
  (gates `lr` = θ, `momentum` = η, `forget` = α; the momentum `S` starts at zero).

Mini-batches of `b` tokens: every gradient of a mini-batch is taken at the weights of its start (`W_mb`);
the weights still move token by token and token t reads `o_t = f_{W_t}(scale · q_t)`.

The parallel form (see docs/deep_memories.md). Inside a mini-batch every update is a linear recurrence with
known coefficients, so with `W_in, S_in` the state entering the mini-batch,

    W_t = cW_t W_in + cS_t S_in - Σ_{j<=t} R_tj G_j,        S_t = cE_t S_in - Σ_{j<=t} RS_tj G_j,

where `G_j` is token j's gradient at `W_mb` and the `[b, b]` matrices `R`, `RS` and vectors `cW`, `cS`, `cE`
are cumulative products of the gates (built with masked cumprods: exact, no division, no token loop). The
gradients are rank one (`∇W1_j = e_j a_jᵀ`, `∇W2_j = g_j k_jᵀ`, `∇W_j = e_j k_jᵀ`), so the state at the end
of a mini-batch is one rank-b matmul, and the reads are attention-like products, e.g.
`W2_t x_t = cW_t W2_in x_t + cS_t S2_in x_t - Σ_j R_tj (k_j·x_t) g_j`. No per-token weights are ever built.

Layouts are heads-first inside (`k: [B, H, T, K]`, gates `[B, H, T]`); the public ops in
`mcrnn.ops.dla` / `mcrnn.ops.titans` take fla's `[B, T, H, K]`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mcrnn.ops.memory import Gate, Memory, State
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale, to_heads_first, weighted_matmul

KINDS = ("dla", "titans")
GATES = {"dla": ("lr", "decay"), "titans": ("lr", "momentum", "forget")}
#: value of a gate that is not given: θ = 1, no decay, no momentum, no forgetting
GATE_DEFAULTS = {"lr": 1.0, "decay": 1.0, "momentum": 0.0, "forget": 0.0}
#: momentum key of each weight
MOMENTUM = {"W": "S", "W1": "S1", "W2": "S2"}


# ----------------------------------------------------------------------------------------------------------
# MLP math
# ----------------------------------------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return F.gelu(x)


def gelu_vjp(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad ⊙ gelu'(x)` in one fused op; autograd differentiates it (gelu_backward has a double backward)."""
    return torch.ops.aten.gelu_backward(grad, x)


def weight_keys(d: dict) -> tuple[str, ...]:
    """`("W",)` for a depth-1 memory, `("W1", "W2")` for the MLP."""
    return ("W",) if "W" in d else ("W1", "W2")


def mlp_read(W: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`f_W(x)` for weights with leading dims `[*L]` and `x: [*L, K]` -> `[*L, V]` (broadcasting allowed)."""
    if "W" in W:
        return (W["W"] @ x.unsqueeze(-1)).squeeze(-1)
    h = (W["W2"] @ x.unsqueeze(-1)).squeeze(-1)
    return x + (W["W1"] @ gelu(h).unsqueeze(-1)).squeeze(-1)


def grad_factors(
    kind: str, W: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, kW: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The rank-one factors of the per-token gradients at the weights `W` (leading dims `[*L]`).

    `k: [*L, n, K]`, `v: [*L, n, V]`; `kW`: `k` times the first layer (`W2` or `W`) transposed, when the
    caller already has it. Returns `e = dℓ/df: [*L, n, V]` and, for the MLP, `a = gelu(W2 k)` and
    `g = (W1ᵀ e) ⊙ gelu'(W2 k)`, both `[*L, n, E]`: then `∇W1 = e aᵀ`, `∇W2 = g kᵀ` (depth 1: `∇W = e kᵀ`).
    """
    first = W["W"] if "W" in W else W["W2"]
    if kW is None and (kind == "titans" or "W" not in W):  # dla at depth 1 needs no forward pass
        kW = k @ first.transpose(-1, -2)
    if "W" in W:
        return {"e": -v if kind == "dla" else kW - v}
    W1 = W["W1"]
    a = gelu(kW)
    e = -v if kind == "dla" else k + a @ W1.transpose(-1, -2) - v
    return {"e": e, "a": a, "g": gelu_vjp(e @ W1, kW)}


def weighted_grads(f: dict[str, torch.Tensor], k: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`Σ_j w_j ∇W_j` from the factors (`[*L, n, ...]`) and weights `w: [*L, n]`, as rank-n matmuls."""
    w = w.unsqueeze(-1)
    if "a" not in f:
        return {"W": (w * f["e"]).transpose(-1, -2) @ k}
    return {"W1": (w * f["e"]).transpose(-1, -2) @ f["a"], "W2": (w * f["g"]).transpose(-1, -2) @ k}


# ----------------------------------------------------------------------------------------------------------
# validation and states
# ----------------------------------------------------------------------------------------------------------


def check_params(params, H: int, K: int, V: int) -> tuple[str, ...]:
    """`params = {"W1": [H, V, E], "W2": [H, E, K]}` (K == V) or `{"W": [H, V, K]}`; returns its keys."""
    if not isinstance(params, dict):
        raise ValueError(
            f"`params` must be a dict {{'W1': [H, V, E], 'W2': [H, E, K]}} or {{'W': [H, V, K]}}, "
            f"got {type(params).__name__}"
        )
    keys = set(params)
    for name in keys:
        x = params[name]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`params['{name}']` must be a 3-dim floating tensor, got {got}")
    if keys == {"W"}:
        shapes = {"W": (H, V, K)}
    elif keys == {"W1", "W2"}:
        if K != V:
            raise ValueError(f"`params` W1/W2 (the residual MLP) needs K == V, got K={K}, V={V} (see `v`)")
        E = params["W1"].shape[-1]
        shapes = {"W1": (H, V, E), "W2": (H, E, K)}
    else:
        raise ValueError(
            f"`params` must have keys {{'W1', 'W2'}} (MLP) or {{'W'}} (depth 1), got {sorted(keys)}"
        )
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            got = list(params[name].shape)
            raise ValueError(f"`params['{name}']` must have shape {list(shape)}, got {got}")
    return tuple(sorted(keys))


def check_mini_batch(mini_batch) -> int:
    if not isinstance(mini_batch, int) or isinstance(mini_batch, bool) or mini_batch < 1:
        raise ValueError(f"`mini_batch` must be an integer >= 1, got {mini_batch!r}")
    return mini_batch


def state_keys(kind: str, wkeys: Sequence[str]) -> tuple[str, ...]:
    keys = tuple(wkeys) + tuple(n + "_mb" for n in wkeys)
    return keys + tuple(MOMENTUM[n] for n in wkeys) if kind == "titans" else keys


def init_state(kind: str, params: dict[str, torch.Tensor], B: int, dtype: torch.dtype) -> State:
    """`M_0`: the weights broadcast to `[B, H, ...]` (also as the mini-batch start) and zero momentum."""
    st = {}
    for n in weight_keys(params):
        W = params[n].to(dtype).unsqueeze(0).expand(B, *params[n].shape).clone()
        st[n], st[n + "_mb"] = W, W
        if kind == "titans":
            st[MOMENTUM[n]] = torch.zeros_like(W)
    return st


def check_deep_state(kind: str, state, params: dict, B: int) -> None:
    """An `initial_state` must hold the current weights `[B, H, ...]`; `*_mb` (default: the current weights)
    and, for titans, the momentum (default: zero) may be left out."""
    if state is None:
        return
    wk = weight_keys(params)
    allowed = state_keys(kind, wk)
    if not isinstance(state, dict):
        got = type(state).__name__
        raise ValueError(f"`initial_state` must be a dict with keys {list(allowed)}, got {got}")
    bad = set(state) - set(allowed)
    missing = [n for n in wk if n not in state]
    if bad or missing:
        raise ValueError(
            f"`initial_state` for {kind} must have keys {list(allowed)} ({list(wk)} required), "
            f"got {sorted(state)}"
        )
    for name, x in state.items():
        base = name[:-3] if name.endswith("_mb") else {m: w for w, m in MOMENTUM.items()}.get(name, name)
        shape = (B, *params[base].shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`initial_state['{name}']` must have shape {list(shape)}, got {got}")


def complete_state(kind: str, state: State, dtype: torch.dtype) -> State:
    """Cast to the compute dtype and fill the optional keys (see :func:`check_deep_state`)."""
    st = {n: x.to(dtype) for n, x in state.items()}
    for n in weight_keys(st):
        st.setdefault(n + "_mb", st[n])
        if kind == "titans":
            st.setdefault(MOMENTUM[n], torch.zeros_like(st[n]))
    return st


def fill_gates(
    kind: str, gates: dict[str, torch.Tensor | None], like: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every gate of `kind` as a tensor shaped like `like` (missing ones take :data:`GATE_DEFAULTS`)."""
    out = {}
    for n in GATES[kind]:
        out[n] = gates[n] if gates.get(n) is not None else torch.full_like(like, GATE_DEFAULTS[n])
    return out


# ----------------------------------------------------------------------------------------------------------
# one token
# ----------------------------------------------------------------------------------------------------------


def deep_step(
    kind: str, state: State, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor], *,
    new_mini_batch: bool,
) -> State:
    """One token of the recurrence. `state` leading `[*L]` (usually `[B, H]`), `k: [*L, K]`, `v: [*L, V]`,
    every gate of `kind` `[*L]`. `new_mini_batch`: this token starts a mini-batch (`W_mb := W`)."""
    wk = weight_keys(state)
    mb = {n: state[n] if new_mini_batch else state[n + "_mb"] for n in wk}
    f = grad_factors(kind, mb, k.unsqueeze(-2), v.unsqueeze(-2))
    grads = weighted_grads(f, k.unsqueeze(-2), gates["lr"].unsqueeze(-1))  # θ_t ∇W_t, outer products
    new = {}
    for n in wk:
        if kind == "dla":
            new[n] = gates["decay"][..., None, None] * state[n] - grads[n]
        else:
            m = MOMENTUM[n]
            new[m] = gates["momentum"][..., None, None] * state[m] - grads[n]
            new[n] = (1.0 - gates["forget"])[..., None, None] * state[n] + new[m]
        new[n + "_mb"] = mb[n]
    return new


# ----------------------------------------------------------------------------------------------------------
# the chunk-parallel scan
# ----------------------------------------------------------------------------------------------------------


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


def _segprod(g: torch.Tensor) -> torch.Tensor:
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


def deep_scan(
    kind: str, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor], *,
    params: dict[str, torch.Tensor], initial: State, layout: Layout, positions: Sequence[int] = (),
    scale: float = 1.0, mix=None,
) -> tuple[torch.Tensor | None, State | None, State]:
    """Chunk-parallel deep memory over `T` tokens (heads-first, compute dtype).

    `q, k: [B, H, T, K]`, `v: [B, H, T, V]`, every gate of `kind` `[B, H, T]`; `params` `[H, ...]` (the `M_0`
    of resets); `initial` a full state (:func:`state_keys`). Python loops over mini-batches only.
    Returns `o: [B, H, T, V]` (None without `q`), the current weights after token `e - 1` for each `e` in
    `positions` (`{name: [B, H, len(positions), ...]}`, None when empty) and the final state.
    """
    B, H, T, K = k.shape
    n, b = layout.idx.shape
    dt = k.dtype
    wk = weight_keys(params)
    titans = kind == "titans"

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, *D] -> [B, H, n, b, *D], zero padding
        if layout.regular:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, n * b - T))
            return x.reshape(B, H, n, b, *x.shape[3:])
        x = torch.cat([x, x.new_zeros(B, H, 1, *x.shape[3:])], dim=2)
        return x[:, :, layout.idx]

    kc, vc = gather(k), gather(v)
    theta = gather(gates["lr"])
    # Coefficients of the in-mini-batch linear recurrences (padding sits after each row's last real token, so
    # by causality it never reaches a real one). The state is stacked in blocks, `[W]` (dla) or `[W; S]`
    # (titans); C[t] are the coefficients of the entering blocks in W_t, `R` those of the gradients.
    if not titans:
        a = gather(gates["decay"])
        R = _segprod(a) * theta.unsqueeze(-2)  # R[t, j] = θ_j Π_{j<i<=t} a_i
        C = a.cumprod(-1).unsqueeze(-1)  # [B, H, n, b, 1]
    else:
        beta, eta = 1.0 - gather(gates["forget"]), gather(gates["momentum"])
        P, Q = _segprod(beta), _segprod(eta)
        cE = eta.cumprod(-1)
        # W_t gets S_s with Π_{s<i<=t} β_i, and S_s gets G_j with Π_{j<i<=s} η_i
        R, RS = (P @ Q) * theta.unsqueeze(-2), Q * theta.unsqueeze(-2)
        C = torch.stack([beta.cumprod(-1), (P @ cE.unsqueeze(-1)).squeeze(-1)], dim=-1)  # [B, H, n, b, 2]

    # End of each mini-batch (row of its last real token): block mix A and gradient weights L.
    last = torch.tensor(layout.length, device=k.device) - 1
    ar = torch.arange(n, device=k.device)
    if not titans:
        A_end, L_end = C[:, :, ar, last].unsqueeze(-2), R[:, :, ar, last].unsqueeze(-2)  # [B, H, n, 1, 1|b]
    else:
        zero = torch.zeros_like(cE[:, :, ar, last])
        A_end = torch.stack([C[:, :, ar, last], torch.stack([zero, cE[:, :, ar, last]], -1)], dim=-2)
        L_end = torch.stack([R[:, :, ar, last], RS[:, :, ar, last]], dim=-2)  # [B, H, n, 2, b]

    # Unbind once: indexing `x[:, :, i]` in the loop would make autograd allocate a full-size zero gradient
    # per mini-batch (select_backward), O(n^2) memory traffic in the backward.
    k_i, v_i, A_i, L_i = kc.unbind(2), vc.unbind(2), A_end.unbind(2), L_end.unbind(2)
    merge = titans or "W1" in wk  # the gradients need k through the first layer: share the matmul with q
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

    def stacked(W: dict, S: dict | None) -> dict[str, torch.Tensor]:
        return {nm: torch.cat([W[nm], S[nm]], dim=-2) if titans else W[nm] for nm in wk}

    M0 = {nm: params[nm].to(dt).unsqueeze(0).expand(B, *params[nm].shape) for nm in wk}
    X0 = stacked(M0, {nm: torch.zeros_like(x) for nm, x in M0.items()})
    rows = {nm: M0[nm].shape[-2] for nm in wk}

    def w_block(X: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {nm: X[nm][..., : rows[nm], :] for nm in wk}

    X = stacked({nm: initial[nm] for nm in wk}, {nm: initial[MOMENTUM[nm]] for nm in wk} if titans else None)
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
        f = grad_factors(kind, Wmb, k_i[i], v_i[i], kW)
        if q is not None:
            outs.append(_read_mini_batch(X, f, x_i[i], R_i[i], RKX_i[i], C_i[i], xX, mix,
                                         i))
        for e, r in snap_at.get(i, ()):
            snap_list[e] = _advance(X, f, k_i[i], C[:, :, i, r].unsqueeze(-2), R[:, :, i, r].unsqueeze(-2))
        X = _advance(X, f, k_i[i], A_i[i], L_i[i])
        mb_is_in = False
    final = w_block(X)
    for nm in wk:
        final[nm + "_mb"] = Wmb[nm]  # the start of the last token's mini-batch (what `deep_step` keeps)
        if titans:
            final[MOMENTUM[nm]] = X[nm][..., rows[nm] :, :]

    o = None
    if q is not None:
        o = torch.stack(outs, dim=2).reshape(B, H, n * b, -1)
        o = o[:, :, :T] if layout.regular else o[:, :, layout.where]
    snaps = None
    if len(positions):
        snaps = {nm: torch.stack([sn[nm] for sn in snap_list], dim=2) for nm in wk}
    return o, snaps, final


# ----------------------------------------------------------------------------------------------------------
# the public ops (fla layout); dla/ and titans/ wrap these
# ----------------------------------------------------------------------------------------------------------


def deep_op(
    kind: str, chunked: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict,
    gates: dict[str, torch.Tensor | None], *, mini_batch: int, scale: float | None,
    initial_state: State | None, output_final_state: bool, offset: int,
) -> tuple[torch.Tensor, State | None]:
    """Validate, convert to heads-first compute dtype, run the token loop (`chunked=False`) or the scan."""
    B, T, H, K, V = check_qkv(q, k, v)
    for name in GATES[kind]:
        check_gate(name, gates.get(name), B, T, H)
    b = check_mini_batch(mini_batch)
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < b:
        raise ValueError(
            f"`offset` (tokens already in the current mini-batch) must be in [0, {b}), got {offset!r}"
        )
    check_params(params, H, K, V)
    check_deep_state(kind, initial_state, params, B)
    dt = compute_dtype(q)
    scale = default_scale(scale, K, default=1.0)
    P = {n: x.to(dt) for n, x in params.items()}
    if initial_state is not None:
        state = complete_state(kind, initial_state, dt)
    else:
        state = init_state(kind, P, B, dt)
    qh, kh, vh = to_heads_first(q, dt), to_heads_first(k, dt), to_heads_first(v, dt)
    g = fill_gates(kind, {n: to_heads_first(x, dt) for n, x in gates.items() if x is not None}, kh[..., 0])
    if chunked:
        layout = mini_batch_layout(T, b, pos0=offset, device=q.device)
        o, _, state = deep_scan(kind, qh, kh, vh, g, params=P, initial=state, layout=layout, scale=scale)
    else:
        outs = []
        for t in range(T):
            state = deep_step(
                kind, state, kh[:, :, t], vh[:, :, t], {n: x[:, :, t] for n, x in g.items()},
                new_mini_batch=(offset + t) % b == 0,
            )
            outs.append(mlp_read(state, qh[:, :, t] * scale))
        o = torch.stack(outs, dim=2)
    final = {n: x.contiguous() for n, x in state.items()} if output_final_state else None
    return o.transpose(1, 2).to(q.dtype), final


# ----------------------------------------------------------------------------------------------------------
# the Memory interface (Memory Caching)
# ----------------------------------------------------------------------------------------------------------


class _DeepMemory(Memory):
    """Shared implementation; subclasses set `kind`. Depth comes from `params` (`{"W"}` or `{"W1", "W2"}`), so
    `readable_keys` lists both forms and :meth:`readable` keeps the ones the state has."""

    kind = ""
    readable_keys = ("W1", "W2", "W")
    linear_read = False
    deep = True

    def default_scale(self, K: int) -> float:
        return 1.0

    def check_dims(self, K, V, *, memory_depth=2):
        if memory_depth == 2 and K != V:
            raise ValueError(
                f"memory {self.name!r} with memory_depth=2 needs head_v_dim == head_dim (the residual MLP maps K "
                f"to V = K), got {V} != {K}: set `expand_v` to 1 or memory_depth=1"
            )

    def make_params(self, H, K, V, *, memory_depth=2, expansion=4):
        self.check_dims(K, V, memory_depth=memory_depth)
        if memory_depth == 1:
            return {"W": torch.zeros(H, V, K)}
        E = expansion * K
        return {"W1": torch.zeros(H, V, E), "W2": torch.zeros(H, E, K)}

    def init_params(self, params, std=0.02, init=torch.nn.init):
        """W_0. Depth 1: `W = 0` (the memory starts as linear attention does). MLP: `W1 ~ N(0, std)` (f_W starts
        close to the identity) and `W2 ~ N(0, 1/E)`, so that `a = gelu(W2 k)` has a small norm for unit keys:
        the inner gradient step on W1 has curvature `‖a‖²`, and `θ‖a‖² > 2` makes the online update diverge
        (with `W2 ~ N(0, 1)` Titans overflows within a few tokens)."""
        if "W1" in params:
            init.normal_(params["W1"], mean=0.0, std=std)
            init.normal_(params["W2"], mean=0.0, std=params["W2"].shape[1] ** -0.5)
        if "W" in params:
            init.zeros_(params["W"])

    def state_numel(self, K, V, *, memory_depth=2, expansion=4):
        weights = V * K if memory_depth == 1 else 2 * expansion * K * K
        # the online state holds the weights, the weights at the mini-batch's start and (titans) the momentum
        return {"state": weights * (3 if self.kind == "titans" else 2), "cache": weights}

    def soup(self, q, k, v, gates, *, blocks, gamma_online, scan_kwargs):
        """Memory Soup over the MLP: `y = x + (Σ γ_i W1_i) gelu((Σ γ_i W2_i) x)`, `x = scale · q`. The cached
        part of the mix is a weighted GEMM per block (no per-token weights); the online `W2_t x_t` and
        `W1_t z_t` come from a pass of the online memory that mixes them in (:class:`SoupMix`)."""
        B, H, T, K = q.shape
        x = q * scan_kwargs["scale"]
        sizes = [t1 - t0 for t0, t1, _, _ in blocks]
        pieces = x.split(sizes, dim=2)
        E = None
        hidden, per_block = [], []
        for (t0, t1, gamma, cache), x_b in zip(blocks, pieces):
            if gamma is None:
                hidden.append(None)
                per_block.append(None)
                continue
            n = gamma.shape[-1]
            W1, W2 = cache["W1"], cache["W2"]  # [B, H, n, V, E], [B, H, n, E, K]
            E = W2.shape[-2]
            W2T = W2.transpose(-1, -2).reshape(B, H, n * K, -1)
            W1T = W1.transpose(-1, -2).reshape(B, H, n * W1.shape[-1], -1)
            hidden.append(weighted_matmul(gamma, x_b, W2T))  # Σ_{i<s} γ_i W2_i x
            per_block.append((t0, gamma, W1T))
        if E is None:
            E = scan_kwargs["params"]["W2"].shape[-2]
        hidden = [h if h is not None else x.new_zeros(B, H, sz, E) for h, sz in zip(hidden, sizes)]
        mix = SoupMix(blocks, gamma_online, torch.cat(hidden, dim=2), per_block)
        o, _, _ = self.scan(q, k, v, gates, mix=mix, **scan_kwargs)
        return o

    def check(self, K, V, params, mini_batch, H):
        if mini_batch is None:
            raise ValueError(f"memory {self.name!r} needs `mini_batch` (an integer >= 1)")
        check_mini_batch(mini_batch)
        if params is None:
            raise ValueError(f"memory {self.name!r} needs `params` (its learned initial weights)")
        check_params(params, H, K, V)

    def readable(self, state: State) -> State:
        return {n: state[n] for n in weight_keys(state)}

    def init_state(self, B, H, K, V, like, params):
        return init_state(self.kind, params, B, like.dtype)

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        g = fill_gates(self.kind, gates, k[..., 0])
        return deep_step(self.kind, state, k, v, g, new_mini_batch=seg_pos % mini_batch == 0)

    def read(self, state, q, scale):
        return mlp_read(state, q * scale)

    def read_dense(self, cache, q, scale):
        """cache `[B, H, N, ...]`, `q: [B, H, t, K]` -> `[B, H, t, N, V]`, one matmul per layer."""
        x = q * scale
        if "W" in cache:
            return torch.einsum("bhnvk,bhtk->bhtnv", cache["W"], x)
        h = torch.einsum("bhnek,bhtk->bhtne", cache["W2"], x)
        return x.unsqueeze(3) + torch.einsum("bhnve,bhtne->bhtnv", cache["W1"], gelu(h))

    def read_groups(self, states, q, scale):
        """states `[G, ...]`, `q: [G, m, K]` -> `[G, m, V]`."""
        x = q * scale
        if "W" in states:
            return x @ states["W"].transpose(-1, -2)
        return x + gelu(x @ states["W2"].transpose(-1, -2)) @ states["W1"].transpose(-1, -2)

    def reads_linearly(self, state: State) -> bool:
        return "W" in state  # depth 1: f_W(x) = W x

    def scan(
        self, q, k, v, gates, *, initial, segment_starts, resets, positions, offset, scale, params, mini_batch,
        mix=None,
    ):
        T = k.shape[2]
        layout = mini_batch_layout(T, mini_batch, segment_starts, resets, pos0=offset, device=k.device)
        g = fill_gates(self.kind, gates, k[..., 0])
        P = {n: x.to(k.dtype) for n, x in params.items()}
        return deep_scan(
            self.kind, q, k, v, g, params=P, initial=initial, layout=layout, positions=positions, scale=scale,
            mix=mix,
        )


class DLAMemory(_DeepMemory):
    """Deep linear attention: `W_t = a_t W_{t-1} - θ_t ∇(-<f_W(k_t), v_t>)` (gates `lr`, `decay`)."""

    name = kind = "dla"
    gates = {"lr": Gate(init_bias=0.0, on_pad=0.0, default=1.0), "decay": Gate(init_bias=3.0, on_pad=1.0, default=1.0)}


class TitansMemory(_DeepMemory):
    """Titans: momentum `S_t = η_t S_{t-1} - θ_t ∇½‖f_W(k_t) - v_t‖²`, `W_t = (1 - α_t) W_{t-1} + S_t`."""

    name = kind = "titans"
    # on padded tokens a momentum of 0 keeps a zero momentum at zero; mid-sequence padding resets it
    gates = {"lr": Gate(init_bias=0.0, on_pad=0.0, default=1.0), "momentum": Gate(init_bias=0.0, on_pad=0.0, default=0.0),
             "forget": Gate(init_bias=-3.0, on_pad=0.0, default=0.0)}



class SoupMix:
    """The hook the deep scan calls per mini-batch to mix its online weights with the caches (Memory Soup).

    `hidden(i, h)`: `h = W2_t x_t` of mini-batch `i`'s tokens `[B, H, b, E]` -> `gelu(γ_s h + Σ γ_i W2_i x)`;
    `output(i, x, z, w1z)`: `w1z = W1_t z` -> `x + γ_s w1z + Σ γ_i W1_i z`."""

    def __init__(self, blocks, gamma_on, hidden, per_block):
        self.block_starts = [t0 for t0, _, _, _ in blocks]
        self.gamma_on, self.hidden_cached, self.per_block = gamma_on, hidden, per_block

    def prepare(self, idx: torch.Tensor) -> None:
        """`idx: [n_mb, b]` token rows of the mini-batches (padding = T)."""
        pad = lambda y: torch.cat([y, torch.zeros_like(y[:, :, :1])], dim=2)
        # gather once and unbind: per-mini-batch indexing would zero-fill a full-size gradient each time
        self.g_on = pad(self.gamma_on)[:, :, idx].unbind(2)
        self.h_c = pad(self.hidden_cached)[:, :, idx].unbind(2)
        self.rows = idx
        self.block_of = [bisect.bisect_right(self.block_starts, int(t)) - 1 for t in idx[:, 0].tolist()]

    def hidden(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return gelu(self.g_on[i].unsqueeze(-1) * h + self.h_c[i])

    def output(self, i: int, x: torch.Tensor, z: torch.Tensor, w1z: torch.Tensor) -> torch.Tensor:
        out = x + self.g_on[i].unsqueeze(-1) * w1z
        blk = self.per_block[self.block_of[i]]
        if blk is None:
            return out
        t0, gamma, W1T = blk
        local = (self.rows[i] - t0).clamp(0, gamma.shape[2] - 1)  # padding rows read anything; dropped later
        return out + weighted_matmul(gamma[:, :, local], z, W1T)
