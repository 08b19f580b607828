"""What the deep memories share behind the :class:`~mcrnn.ops.memory.Memory` interface: :class:`DeepMemory`
(the MLP memory trained online, one gradient step per token, SPEC §1) and :class:`SoupMix` (Memory Soup over it).

A deep memory (`mcrnn/ops/dla/memory.py`, `mcrnn/ops/titans/memory.py`) defines only what makes it itself:
its gates, the error `e = dℓ/df` of its loss, its per-token update, its extra state (stacked with the weights
in the scan) and the in-mini-batch map of its update (:meth:`DeepMemory.transition`).

Depth comes from `params` (`{"W"}` or `{"W1", "W2"}`), so `readable_keys` lists both forms and
:meth:`~DeepMemory.readable` keeps the ones the state has.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mcrnn.ops.deep.checks import check_mini_batch, check_params
from mcrnn.ops.deep.mlp import gelu, gelu_vjp, mlp_read, token_gradient, weight_keys
from mcrnn.ops.deep.scan import deep_scan, mini_batch_layout
from mcrnn.ops.memory import Memory, State
from mcrnn.ops.utils import weighted_matmul


class DeepMemory(Memory):
    """An MLP memory `f_W(x) = x + W1 gelu(W2 x)` (or `W x`) trained online on a per-token loss, with
    mini-batches: every gradient of a mini-batch is taken at the weights of its start (`W_mb`)."""

    readable_keys = ("W1", "W2", "W")
    linear_read = False
    deep = True
    #: `e = dℓ/df` depends on `f_W(k)`: the gradients need a forward pass through the memory at `W_mb`
    error_needs_forward = True

    # ---- what a deep memory defines ----------------------------------------------------------------------
    def error(self, f: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """`e = dℓ/df` at `f = f_W(k)` (None when not :attr:`error_needs_forward`): `[*L, V]`."""
        raise NotImplementedError

    def error_vjp(self, de: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(dℓ'/df, dℓ'/dv)` from `dℓ'/de` (the error is affine in `f` and `v`); `None` for no dependence on `f`."""
        raise NotImplementedError

    def update(self, state: State, grads: State, gates: dict[str, torch.Tensor]) -> State:
        """One token: the new weights (and extra entries) from the state, the token's gradients `∇W` at `W_mb`
        (`[*L, ...]` like the weights) and every gate `[*L]`."""
        raise NotImplementedError

    def blocks(self, weight: str) -> tuple[str, ...]:
        """The state entries of one weight, stacked in the scan (the weight first; titans: its momentum)."""
        return (weight,)

    def with_extras(self, W: State) -> State:
        """The weights `W` and the memory's extra entries at their initial value."""
        return dict(W)

    def transition(self, gates: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The in-mini-batch map: gates `[..., b]` (one mini-batch per row) -> `A: [..., b, m, m]`,
        `L: [..., b, m, b]` with `X_t = A_t X_in − Σ_j L_tj ∇_j`, `X` the `m` stacked :meth:`blocks`
        of a weight; `L_tj = 0` for `j > t`. No division and no logarithm: gates of exactly 0 stay exact."""
        raise NotImplementedError

    # ---- gates and states ------------------------------------------------------------------------------
    def fill_gates(self, gates: dict[str, torch.Tensor | None], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every gate as a tensor shaped like `like` (missing ones take their :class:`Gate` default)."""
        return {n: gates[n] if gates.get(n) is not None else torch.full_like(like, g.default)
                for n, g in self.gates.items()}

    def state_keys(self, params: dict) -> tuple[str, ...]:
        """The weights, their value at the current mini-batch's start (`*_mb`) and the extra entries."""
        wk = weight_keys(params)
        return wk + tuple(n + "_mb" for n in wk) + tuple(key for n in wk for key in self.blocks(n)[1:])

    def check_state(self, state, params: dict, B: int) -> None:
        """An `initial_state` must hold the current weights `[B, H, ...]`; `*_mb` (default: the current weights)
        and the extra entries (default: their initial value) may be left out."""
        if state is None:
            return
        wk = weight_keys(params)
        allowed = self.state_keys(params)
        if not isinstance(state, dict):
            got = type(state).__name__
            raise ValueError(f"`initial_state` must be a dict with keys {list(allowed)}, got {got}")
        bad = set(state) - set(allowed)
        missing = [n for n in wk if n not in state]
        if bad or missing:
            raise ValueError(
                f"`initial_state` for {self.name} must have keys {list(allowed)} ({list(wk)} required), "
                f"got {sorted(state)}"
            )
        weight_of = {key: n for n in wk for key in (*self.blocks(n), n + "_mb")}
        for name, x in state.items():
            shape = (B, *params[weight_of[name]].shape)
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
                got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"`initial_state['{name}']` must have shape {list(shape)}, got {got}")

    def complete_state(self, state: State, dtype: torch.dtype) -> State:
        """Cast to the compute dtype and fill the optional keys (see :meth:`check_state`)."""
        st = {n: x.to(dtype) for n, x in state.items()}
        wk = weight_keys(st)
        for n in wk:
            st.setdefault(n + "_mb", st[n])
        for key, x in self.with_extras({n: st[n] for n in wk}).items():
            st.setdefault(key, x)
        return st

    # ---- the Memory interface ------------------------------------------------------------------------------
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
        # the online state holds every weight's stacked entries (titans: its momentum too) and the weights at
        # the current mini-batch's start
        return {"state": weights * (len(self.blocks("W")) + 1), "cache": weights}

    def soup(self, q, k, v, gates, *, blocks, gamma_online, scan_kwargs):
        """Memory Soup over the MLP: `y = x + (Σ γ_i W1_i) gelu((Σ γ_i W2_i) x)`, `x = scale · q`. The cached
        part of the mix is a weighted GEMM per block (no per-token weights); the online `W2_t x_t` and
        `W1_t z_t` come from a pass of the online memory that mixes them in (:class:`SoupMix`)."""
        B, H, T, K = q.shape
        x = q * scan_kwargs["scale"]
        E = scan_kwargs["params"]["W2"].shape[-2]
        hidden, cached_W1 = [], []
        for (t0, t1, gamma, cache), x_b in zip(blocks, x.split([t1 - t0 for t0, t1, _, _ in blocks], dim=2)):
            if gamma is None:
                hidden.append(x.new_zeros(B, H, t1 - t0, E))
                cached_W1.append((t0, t1, None, None))
                continue
            n = gamma.shape[-1]
            W1, W2 = cache["W1"], cache["W2"]  # [B, H, n, V, E], [B, H, n, E, K]
            hidden.append(weighted_matmul(gamma, x_b, W2.transpose(-1, -2).reshape(B, H, n * K, E)))  # Σ γ_i W2_i x
            cached_W1.append((t0, t1, gamma, W1.transpose(-1, -2).reshape(B, H, n * E, -1)))
        mix = SoupMix(gamma_online, torch.cat(hidden, dim=2), cached_W1)
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
        """`M_0`: the weights broadcast to `[B, H, ...]` (also as the mini-batch start) and the extra entries."""
        W = {n: params[n].to(like.dtype).unsqueeze(0).expand(B, *params[n].shape).clone() for n in weight_keys(params)}
        st = self.with_extras(W)
        st.update({n + "_mb": x for n, x in W.items()})
        return st

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        """One token, literally SPEC §1: the explicit gradient of the token's loss at `W_mb`, then the update."""
        g = self.fill_gates(gates, k[..., 0])
        wk = weight_keys(state)
        W_mb = {n: state[n] if seg_pos % mini_batch == 0 else state[n + "_mb"] for n in wk}
        new = self.update(state, token_gradient(W_mb, k, v, self.error, self.error_needs_forward), g)
        new.update({n + "_mb": W_mb[n] for n in wk})
        return new

    def read(self, state, q, scale):
        return mlp_read(state, q * scale)

    def read_dense(self, cache, q, scale):
        """cache `[B, H, N, ...]`, `q: [B, H, t, K]` -> `[B, H, t, N, V]`, one matmul per layer."""
        x = q * scale
        if "W" in cache:
            return torch.einsum("bhnvk,bhtk->bhtnv", cache["W"], x)
        h = torch.einsum("bhnek,bhtk->bhtne", cache["W2"], x)
        return x.unsqueeze(3) + torch.einsum("bhnve,bhtne->bhtnv", cache["W1"], gelu(h))

    def read_weighted(self, cache, weights, q, scale):
        """`Σ_n w_n f_{W_n}(x)`, `x = scale · q`: cache `[B, H, N, ...]`, weights `[B, H, t, N]`, `q: [B, H, t, K]`
        -> `[B, H, t, V]` (GRM's reads). Two GEMMs over the stacked caches, no `[t, N, V]` intermediate; the
        hidden `[t, N·E]` activations are recomputed in the backward instead of stored (:class:`_WeightedMLP`)."""
        x = q * scale
        B, H, N = weights.shape[0], weights.shape[1], weights.shape[-1]
        if "W" in cache:  # depth 1: linear in the weights
            W = cache["W"]
            return weighted_matmul(weights, x, W.transpose(-1, -2).reshape(B, H, N * W.shape[-1], W.shape[-2]))
        W1, W2 = cache["W1"], cache["W2"]  # [B, H, N, V, E], [B, H, N, E, K]
        W2s = W2.permute(0, 1, 4, 2, 3).reshape(B, H, W2.shape[-1], N * W2.shape[-2])  # [K, N·E]
        W1s = W1.transpose(-1, -2).reshape(B, H, N * W1.shape[-1], W1.shape[-2])  # [N·E, V]
        return _WeightedMLP.apply(weights, x, W2s, W1s)

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
        P = {n: x.to(k.dtype) for n, x in params.items()}
        return deep_scan(
            self, q, k, v, self.fill_gates(gates, k[..., 0]), params=P, initial=initial, layout=layout,
            positions=positions, scale=scale, mix=mix,
        )


class _WeightedMLP(torch.autograd.Function):
    """`y_t = (Σ_n w_tn) x_t + Σ_n w_tn W1_n gelu(W2_n x_t)`: `w: [*, t, N]`, `x: [*, t, K]`,
    `W2s = [W2_1ᵀ, ..., W2_Nᵀ]: [*, K, N·E]`, `W1s = [W1_1ᵀ; ...; W1_Nᵀ]: [*, N·E, V]` -> `[*, t, V]`.

    Per chunk of tokens, `h = x W2s` for all caches in one GEMM, then `(w ⊗ 1_E) ⊙ gelu(h)` times `W1s` in one
    GEMM. The chunks keep the hidden activations (`[chunk, N·E]`, the largest tensors) cache-sized: on CPU the
    elementwise passes over them cost as much as the GEMMs. The backward recomputes them instead of storing."""

    @staticmethod
    def forward(ctx, w, x, W2s, W1s):
        ctx.save_for_backward(w, x, W2s, W1s)
        N = w.shape[-1]
        out = []
        for w_c, x_c in zip(*_token_chunks(w, x, W2s), strict=True):
            u = (gelu(x_c @ W2s).unflatten(-1, (N, -1)) * w_c.unsqueeze(-1)).flatten(-2)
            out.append(torch.addcmul(u @ W1s, w_c.sum(-1, keepdim=True), x_c))
        return torch.cat(out, dim=-2) if len(out) > 1 else out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        w, x, W2s, W1s = ctx.saved_tensors
        N = w.shape[-1]
        dW1s, dW2s = torch.zeros_like(W1s), torch.zeros_like(W2s)
        dws, dxs = [], []
        for w_c, x_c, dy_c in zip(*_token_chunks(w, x, W2s, dy), strict=True):
            h = x_c @ W2s
            a = gelu(h).unflatten(-1, (N, -1))  # [*, c, N, E]
            du = (dy_c @ W1s.transpose(-1, -2)).unflatten(-1, (N, -1))
            dW1s += (a * w_c.unsqueeze(-1)).flatten(-2).transpose(-1, -2) @ dy_c
            dws.append((du * a).sum(-1) + (dy_c * x_c).sum(-1, keepdim=True))
            dh = gelu_vjp((du * w_c.unsqueeze(-1)).flatten(-2), h)
            dxs.append(torch.addcmul(dh @ W2s.transpose(-1, -2), w_c.sum(-1, keepdim=True), dy_c))
            dW2s += x_c.transpose(-1, -2) @ dh
        return torch.cat(dws, dim=-2), torch.cat(dxs, dim=-2), dW2s, dW1s


def _token_chunks(w: torch.Tensor, x: torch.Tensor, W2s: torch.Tensor, *more: torch.Tensor) -> list:
    """Split `w, x, *more` (`[*, t, ·]`) along the tokens so that one chunk's hidden activations `[*, c, N·E]`
    stay within about 4 MiB (and at least 16 tokens)."""
    per_token = W2s[..., 0, :].numel() * W2s.element_size()
    c = max(16, (1 << 22) // max(per_token, 1))
    return [t.split(c, dim=-2) for t in (w, x, *more)]


class SoupMix:
    """Memory Soup's mix of the online weights with the caches, in token order (the deep scan applies it).

    The scan computes the online `h = W2_t x_t`, then `z = gelu(γ_s h + hc)` with `hc = Σ γ_i W2_i x` (the
    cached part, `hidden_cached: [B, H, T, E]`; `gamma_on: [B, H, T, 1]`), then `w1z = W1_t z_t`, and
    :meth:`output` adds the cached `Σ γ_i W1_i z`. `cached_W1`: per token block `(t0, t1, γ: [B, H, t1 - t0, n],
    [W1_1ᵀ; ...; W1_nᵀ]: [B, H, n·E, V])`, both None when no cache is visible there."""

    def __init__(self, gamma_online: torch.Tensor, hidden_cached: torch.Tensor, cached_W1: list):
        self.gamma_on, self.hidden_cached, self.cached_W1 = gamma_online.unsqueeze(-1), hidden_cached, cached_W1

    def output(self, x: torch.Tensor, z: torch.Tensor, w1z: torch.Tensor) -> torch.Tensor:
        """`x + γ_s w1z + Σ γ_i W1_i z`: all `[B, H, T, ·]`."""
        B, H, _, V = w1z.shape
        cached = [
            weighted_matmul(gamma, z[:, :, t0:t1], W1T) if gamma is not None else z.new_zeros(B, H, t1 - t0, V)
            for t0, t1, gamma, W1T in self.cached_W1
        ]
        return torch.addcmul(x, self.gamma_on, w1z) + torch.cat(cached, dim=2)
