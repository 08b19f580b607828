"""The memory interface that Memory Caching is written against, and the linear memories.

A memory is a recurrent state with an update and a read (SPEC §1). Memory Caching (the aggregations, the
segmentation, the cache) only talks to a memory through this interface, so a new memory is one subclass
registered in :data:`MEMORIES`; nothing in the aggregations changes.

Layouts are heads-first inside the ops: `k: [B, H, T, K]`, `v: [B, H, T, V]`, gates `[B, H, T]`, already in the
compute dtype (float32, float64 for float64 inputs). A state is a dict of tensors with leading `[B, H]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcrnn.ops.linear.chunk import _log_decay, linear_scan
from mcrnn.ops.swla.chunk import swla_scan

State = dict[str, torch.Tensor]


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


class Memory:
    """Base class. Subclasses set the class attributes and implement the methods marked abstract."""

    name: str = ""
    gate_names: tuple[str, ...] = ()
    #: keys of the state that a read needs; caches keep only these
    readable_keys: tuple[str, ...] = ()
    #: True when `read` is linear in the state: then Memory Soup equals GRM exactly (SPEC §2.3)
    linear_read: bool = True
    #: True when the memory takes learned initial weights (`params`) and `mini_batch`
    deep: bool = False

    def default_scale(self, K: int) -> float:
        return K**-0.5

    def check(self, K: int, V: int, params: dict | None, mini_batch: int | None, H: int) -> None:
        """Raise ValueError for arguments this memory cannot take."""
        if params is not None:
            raise ValueError(f"memory {self.name!r} has no learned initial state: pass `params=None`")

    def init_state(self, B: int, H: int, K: int, V: int, like: torch.Tensor, params: dict | None) -> State:
        """The initial state `M_0`, batched: every segment of `independent` MC starts from it."""
        raise NotImplementedError

    def step(
        self, state: State, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor], *,
        seg_pos: int, params: dict | None, mini_batch: int | None,
    ) -> State:
        """One token: `k: [B, H, K]`, `v: [B, H, V]`, gates `[B, H]`. `seg_pos` is the token's position inside
        its segment (deep memories start a new mini-batch where `seg_pos % mini_batch == 0`)."""
        raise NotImplementedError

    def read(self, state: State, q: torch.Tensor, scale: float) -> torch.Tensor:
        """`state` with leading dims `[*L]`, `q: [*L, K]` -> `[*L, V]`."""
        raise NotImplementedError

    def read_dense(self, cache: State, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Every query against every cached state: cache `[B, H, N, ...]`, `q: [B, H, t, K]` -> `[B, H, t, N, V]`."""
        N = next(iter(cache.values())).shape[2]
        t = q.shape[2]
        states = {n: x.unsqueeze(2).expand(-1, -1, t, *x.shape[2:]) for n, x in cache.items()}
        return self.read(states, q.unsqueeze(3).expand(-1, -1, -1, N, -1), scale)

    def read_weighted(self, cache: State, weights: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
        """`Σ_n weights[..., n] · read(cache_n, q)`: cache `[B, H, N, ...]`, weights `[B, H, t, N]`,
        `q: [B, H, t, K]` -> `[B, H, t, V]` (GRM, residual and mean all read this way)."""
        return torch.einsum("bhtn,bhtnv->bhtv", weights, self.read_dense(cache, q, scale))

    def read_groups(self, states: State, q: torch.Tensor, scale: float) -> torch.Tensor:
        """One state per group: states `[G, ...]`, `q: [G, m, K]` -> `[G, m, V]`."""
        m = q.shape[1]
        return self.read({n: x.unsqueeze(1).expand(-1, m, *x.shape[1:]) for n, x in states.items()}, q, scale)

    def scan(
        self, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor], *,
        initial: State, segment_starts: Sequence[int], resets: Sequence[int], positions: Sequence[int],
        offset: int, scale: float, params: dict | None, mini_batch: int | None,
    ) -> tuple[torch.Tensor | None, State | None, State]:
        """Chunk-parallel run over `T` tokens.

        `segment_starts`: positions where a segment begins; `resets` (a subset) restart the state from `M_0`
        before that token (`independent` MC). `offset`: the position of token 0 inside its segment when 0 is
        not in `segment_starts` (the call continues a segment; deep memories need it for mini-batch alignment).
        `positions`: exclusive ends whose readable state is returned.
        Returns `o: [B, H, T, V]` (None when `q` is None), snapshots `[B, H, E, ...]` (readable keys, None
        when `positions` is empty) and the full final state.
        """
        raise NotImplementedError

    def readable(self, state: State) -> State:
        return {n: state[n] for n in self.readable_keys}

    def reads_linearly(self, state: State) -> bool:
        """Is `read` linear in this state? Then Memory Soup equals GRM exactly (SPEC §2.3)."""
        return self.linear_read


class LinearMemory(Memory):
    """`S_t = a_t S_{t-1} + k_t v_tᵀ`, read `q_tᵀ S_t` (gate `decay`, default 1)."""

    name = "linear"
    gate_names = ("decay",)
    readable_keys = ("S",)

    def init_state(self, B, H, K, V, like, params):
        return {"S": like.new_zeros(B, H, K, V)}

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        a = gates["decay"][..., None, None] if "decay" in gates else 1.0
        return {"S": a * state["S"] + k.unsqueeze(-1) * v.unsqueeze(-2)}

    def read(self, state, q, scale):
        return torch.einsum("...k,...kv->...v", q * scale, state["S"])

    def read_dense(self, cache, q, scale):
        S = cache["S"]  # [B, H, N, K, V]
        B, H, N, K, V = S.shape
        flat = S.permute(0, 1, 3, 2, 4).reshape(B, H, K, N * V)
        return ((q * scale) @ flat).view(B, H, q.shape[2], N, V)

    def read_weighted(self, cache, weights, q, scale):
        # Σ_n w_n qᵀ S_n = [w_1 q, ..., w_N q] · [S_1; ...; S_N]: one GEMM, no [t, N, V] intermediate
        S = cache["S"]
        B, H, N, K, V = S.shape
        return weighted_matmul(weights, q * scale, S.reshape(B, H, N * K, V))

    def read_groups(self, states, q, scale):
        return (q * scale) @ states["S"]

    def scan(self, q, k, v, gates, *, initial, segment_starts, resets, positions, offset, scale, params, mini_batch):
        log_a = _log_decay(gates["decay"]) if "decay" in gates else None
        o, snaps, final = linear_scan(
            q * scale if q is not None else None, k, v, log_a,
            resets=resets, initial_state=initial["S"], positions=positions,
        )
        return o, ({"S": snaps} if snaps is not None else None), {"S": final}


class SWLAMemory(LinearMemory):
    """Sliding-window linear attention, window 2 (gates `decay`, `prev`, `cur`, default 1).

    The state carries the previous token's `(k, v)`; `M_0` has them at zero, so restarting from `M_0` drops
    the `b_t k_{t-1} v_{t-1}ᵀ` term at a segment start (SPEC §1 decision)."""

    name = "swla"
    gate_names = ("decay", "prev", "cur")

    def init_state(self, B, H, K, V, like, params):
        return {"S": like.new_zeros(B, H, K, V), "k": like.new_zeros(B, H, K), "v": like.new_zeros(B, H, V)}

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        def g(name):
            return gates[name][..., None, None] if name in gates else 1.0

        S = (
            g("decay") * state["S"]
            + g("prev") * state["k"].unsqueeze(-1) * state["v"].unsqueeze(-2)
            + g("cur") * k.unsqueeze(-1) * v.unsqueeze(-2)
        )
        return {"S": S, "k": k, "v": v}

    def scan(self, q, k, v, gates, *, initial, segment_starts, resets, positions, offset, scale, params, mini_batch):
        o, snaps, final = swla_scan(
            q * scale if q is not None else None, k, v,
            gates.get("decay"), gates.get("prev"), gates.get("cur"),
            initial_state=initial, resets=resets, positions=positions,
        )
        return o, (self.readable(snaps) if snaps is not None else None), final


MEMORIES: dict[str, Memory] = {"linear": LinearMemory(), "swla": SWLAMemory()}


def register_memory(memory: Memory) -> Memory:
    """Make a memory available to `memory_caching(..., memory=name)`."""
    MEMORIES[memory.name] = memory
    return memory


def get_memory(name: str) -> Memory:
    if name not in MEMORIES:
        raise ValueError(f"unknown `memory` {name!r}: choose one of {sorted(MEMORIES)}")
    return MEMORIES[name]
