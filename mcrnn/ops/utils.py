"""Shared checks, dtype helpers and the weighted matmul of cached reads (torch only)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """States and accumulations are float32 whatever the input dtype (float64 stays float64 for tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate `q, k: [B, T, H, K]`, `v: [B, T, H, V]`; return `(B, T, H, K, V)`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"`{name}` must have shape [B, T, H, D] (4 dims), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"`{name}` must be float16, bfloat16, float32 or float64, got {x.dtype}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"`k` must have the shape of `q` {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"`v` must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if T < 1:
        raise ValueError("the sequence is empty: `q` must have at least one token (T >= 1)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("`q`, `k`, `v` must be on one device")
    return B, T, H, K, v.shape[-1]


def check_gate(
    name: str, g: torch.Tensor | None, B: int, T: int, H: int, lo: float | None = 0.0, hi: float | None = 1.0
) -> None:
    """Per-token per-head gates are `[B, T, H]`; `lo`/`hi` bound their values (None: unbounded)."""
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise ValueError(f"gate `{name}` must be a tensor of shape [B, T, H], got {type(g).__name__}")
    if tuple(g.shape) != (B, T, H):
        raise ValueError(f"gate `{name}` must have shape [B, T, H] = [{B}, {T}, {H}], got {tuple(g.shape)}")
    if torch.compiler.is_compiling():
        return  # the value checks read the data (a host sync and a graph break): eager calls make them
    if not torch.isfinite(g).all():
        raise ValueError(f"gate `{name}` contains NaN or inf")
    if lo is not None and hi is not None:
        if bool(((g < lo) | (g > hi)).any()):
            raise ValueError(
                f"gate `{name}` must lie in [{lo}, {hi}] (use a sigmoid), got values in "
                f"[{g.min().item():.4g}, {g.max().item():.4g}]"
            )


def default_scale(scale: float | None, K: int, default: float | None = None) -> float:
    if scale is None:
        return K**-0.5 if default is None else default
    if not isinstance(scale, (int, float)) or not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"`scale` must be a finite number, got {scale!r}")
    return float(scale)


def to_heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[B, T, H, D] -> [B, H, T, D]` (gates `[B, T, H] -> [B, H, T]`) in the compute dtype."""
    return x.transpose(1, 2).to(dtype)


class _WeightedMatmul(torch.autograd.Function):
    """`out_t = Σ_n w_tn · (x_t @ W_n)`: `w: [*, t, N]`, `x: [*, t, D]`, `W: [*, N·D, V]` -> `[*, t, V]`.

    One GEMM over the mixed inputs `[w_t1 x_t, ..., w_tN x_t]`. The mixed inputs (`t × N × D`) are rebuilt in
    the backward pass instead of being stored."""

    @staticmethod
    def forward(ctx, w, x, W):
        ctx.save_for_backward(w, x, W)
        return _mix(w, x) @ W

    @staticmethod
    def backward(ctx, d_out):
        w, x, W = ctx.saved_tensors
        d_w = d_x = d_W = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_mixed = (d_out @ W.transpose(-1, -2)).unflatten(-1, (w.shape[-1], x.shape[-1]))  # [*, t, N, D]
            if ctx.needs_input_grad[0]:
                d_w = (d_mixed * x.unsqueeze(-2)).sum(-1)
            if ctx.needs_input_grad[1]:
                d_x = (w.unsqueeze(-2) @ d_mixed).squeeze(-2)
        if ctx.needs_input_grad[2]:
            d_W = _mix(w, x).transpose(-1, -2) @ d_out
        return d_w, d_x, d_W


def _mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def weighted_matmul(w: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """`Σ_n w[..., n] · (x @ W_n)` with `W: [*, N·D, V]` the `N` matrices `[D, V]` stacked (see `_WeightedMatmul`)."""
    return _WeightedMatmul.apply(w, x, W)


class _SelectedMatmul(torch.autograd.Function):
    """`out_t = Σ_j w_tj · (x_t @ W[pick_tj])` for matrix states `W: [G, P, D, V]` (`G` = batch · heads),
    `x: [G, T, D]`, `pick, w: [G, T, k]`; pairs with `valid` False are skipped (their weight must be 0).

    The (token, state) pairs are sorted by state once; each state then reads its tokens with one dense
    `[n, D] x [D, V]` product written in place (no concatenation), so only the selected states are read and
    nothing of size `T x k x D x V` is built. The backward needs one product per state for both `d_x` and
    `d_w` (`g = d_out W_sᵀ`: `d_w = <x, g>`, `d_x = w g`) and one for `d_W`."""

    @staticmethod
    def forward(ctx, w, x, W, pick, valid):
        G, T, D = x.shape
        P, V = W.shape[1], W.shape[-1]
        k = pick.shape[-1]
        g = torch.arange(G, device=x.device).view(G, 1, 1)
        key = (g * P + pick).reshape(-1)  # which state each pair reads
        tok = (g * T + torch.arange(T, device=x.device).view(1, T, 1)).expand(G, T, k).reshape(-1)
        pair = torch.arange(key.numel(), device=x.device)
        keep = valid.reshape(-1)
        key, tok, pair = key[keep], tok[keep], pair[keep]
        order = torch.argsort(key, stable=True)
        key, tok, pair = key[order], tok[order], pair[order]
        counts = torch.bincount(key, minlength=G * P).tolist()  # one host sync per call
        ctx.save_for_backward(w, x, W, tok, pair)
        ctx.counts = counts
        xs = x.reshape(G * T, D).index_select(0, tok) * w.reshape(-1).index_select(0, pair).unsqueeze(-1)
        Wf = W.reshape(G * P, D, V)
        ys = xs.new_empty(xs.shape[0], V)
        for s, a, c in _groups(counts):
            torch.mm(xs[a:a + c], Wf[s], out=ys[a:a + c])
        return x.new_zeros(G * T, V).index_add_(0, tok, ys).view(G, T, V)

    @staticmethod
    def backward(ctx, d_out):
        w, x, W, tok, pair = ctx.saved_tensors
        G, T, D = x.shape
        P, V = W.shape[1], W.shape[-1]
        Wf = W.reshape(G * P, D, V)
        xs = x.reshape(G * T, D).index_select(0, tok)
        ws = w.reshape(-1).index_select(0, pair).unsqueeze(-1)
        dos = d_out.reshape(G * T, V).index_select(0, tok)
        d_w = d_x = d_W = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gs = xs.new_empty(xs.shape[0], D)  # d_out_t W_sᵀ for every pair
            for s, a, c in _groups(ctx.counts):
                torch.mm(dos[a:a + c], Wf[s].T, out=gs[a:a + c])
            if ctx.needs_input_grad[0]:
                d_w = w.new_zeros(w.numel()).index_put_((pair,), (xs * gs).sum(-1)).view(w.shape)
            if ctx.needs_input_grad[1]:
                d_x = x.new_zeros(G * T, D).index_add_(0, tok, gs.mul_(ws)).view(x.shape)
        if ctx.needs_input_grad[2]:
            xs.mul_(ws)
            d_W = W.new_zeros(G * P, D, V)
            for s, a, c in _groups(ctx.counts):
                torch.mm(xs[a:a + c].T, dos[a:a + c], out=d_W[s])
            d_W = d_W.view(W.shape)
        return d_w, d_x, d_W, None, None


def _groups(counts: list[int]):
    """`(state, first pair, number of pairs)` for every state read by at least one pair."""
    a = 0
    for s, c in enumerate(counts):
        if c:
            yield s, a, c
            a += c


def selected_matmul(w: torch.Tensor, x: torch.Tensor, W: torch.Tensor, pick: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """`Σ_j w[..., j] · (x @ W[pick[..., j]])`: `x: [*G, T, D]`, `W: [*G, P, D, V]`, `pick, w, valid: [*G, T, k]`
    -> `[*G, T, V]`; only the selected states are read (see `_SelectedMatmul`)."""
    lead = x.shape[:-2]
    flat = lambda y, n: y.reshape(-1, *y.shape[len(lead):]) if n else y
    out = _SelectedMatmul.apply(flat(w, 1), flat(x, 1), flat(W, 1), flat(pick, 1), flat(valid, 1))
    return out.view(*lead, *out.shape[1:])


class _SpanWeightedMatmul(torch.autograd.Function):
    """`out_t = Σ_p w_tp · (x_t @ W_p)` where token block `[t0, t1)` reads only the states `[p0, p1)` of
    `spans` (its weights outside that range must be 0): `w: [G, T, P]`, `x: [G, T, D]`, `W: [G, P, D, V]`.

    Per block one GEMM over the mixed inputs `[w_t,p0 x_t, ..., w_t,p1-1 x_t] · [W_p0; ...; W_p1-1]` (no
    `[t, n, V]` intermediate). The whole call is one autograd node: its backward accumulates the state gradients
    in place instead of zero-filling a full-size gradient per block, and rebuilds the mixed inputs."""

    @staticmethod
    def forward(ctx, w, x, W, spans):
        G, T, D = x.shape
        V = W.shape[-1]
        out = x.new_zeros(G, T, V)
        for t0, t1, p0, p1 in spans:
            if p1 > p0:
                mixed = (w[:, t0:t1, p0:p1, None] * x[:, t0:t1, None, :]).flatten(2)
                out[:, t0:t1] = torch.bmm(mixed, W[:, p0:p1].reshape(G, -1, V))
        ctx.save_for_backward(w, x, W)
        ctx.spans = spans
        return out

    @staticmethod
    def backward(ctx, d_out):
        w, x, W = ctx.saved_tensors
        G, T, D = x.shape
        V = W.shape[-1]
        d_w = torch.zeros_like(w) if ctx.needs_input_grad[0] else None
        d_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        d_W = torch.zeros_like(W) if ctx.needs_input_grad[2] else None
        for t0, t1, p0, p1 in ctx.spans:
            if p1 <= p0:
                continue
            n, dO, xb, wb = p1 - p0, d_out[:, t0:t1], x[:, t0:t1], w[:, t0:t1, p0:p1]
            if d_w is not None or d_x is not None:
                d_mixed = torch.bmm(dO, W[:, p0:p1].reshape(G, n * D, V).transpose(1, 2)).view(G, -1, n, D)
                if d_w is not None:
                    d_w[:, t0:t1, p0:p1] = (d_mixed * xb.unsqueeze(2)).sum(-1)
                if d_x is not None:
                    d_x[:, t0:t1] = (wb.unsqueeze(-2) @ d_mixed).squeeze(-2)
            if d_W is not None:
                mixed = (wb.unsqueeze(-1) * xb.unsqueeze(2)).flatten(2)
                d_W[:, p0:p1] += torch.bmm(mixed.transpose(1, 2), dO).view(G, n, D, V)
        return d_w, d_x, d_W, None


def span_weighted_matmul(w: torch.Tensor, x: torch.Tensor, W: torch.Tensor, spans) -> torch.Tensor:
    """`Σ_p w[..., p] · (x @ W_p)` block by block: `w: [*G, T, P]`, `x: [*G, T, D]`, `W: [*G, P, D, V]`,
    `spans`: `(t0, t1, p0, p1)` per token block (see `_SpanWeightedMatmul`) -> `[*G, T, V]`."""
    lead = x.shape[:-2]
    out = _SpanWeightedMatmul.apply(w.reshape(-1, *w.shape[-2:]), x.reshape(-1, *x.shape[-2:]),
                                    W.reshape(-1, *W.shape[-3:]), spans)
    return out.view(*lead, *out.shape[1:])
