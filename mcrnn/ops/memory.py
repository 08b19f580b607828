"""The interface that Memory Caching is written against: a recurrent memory owns all of its knowledge.

A memory is a recurrent state with an update and a read (SPEC §1). Memory Caching (the aggregations, the
segmentation, the cache), the layers and the models only talk to a memory through this class: its gates
(names, initial bias, value on padded tokens), its learned parameters, its state and its cost all live in
the memory's own folder (`mcrnn/ops/<name>/memory.py`), registered with one line in
:mod:`mcrnn.ops.registry`.

Layouts are heads-first inside the ops: `k: [B, H, T, K]`, `v: [B, H, T, V]`, gates `[B, H, T]`, already in
the compute dtype (float32, float64 for float64 inputs). A state is a dict of tensors with leading `[B, H]`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Gate:
    """One per-token per-head gate of a memory.

    Attributes:
        init_bias: the bias a layer's gate projection starts at (the gates start near "remember").
        on_pad: the value on padded tokens: with zero keys and values it leaves the memory unchanged.
        default: the value an op uses when the gate is not given.
        hi: upper bound of the gate's values that the ops accept (the lower bound is 0).
        layer_hi: the layer's range, `layer_hi · sigmoid(·)`; a layer with `allow_neg_eigval` uses `hi` instead
            (the delta rule's `β ∈ [0, 2]`).
    """

    init_bias: float = 0.0
    on_pad: float = 1.0
    default: float = 1.0
    hi: float = 1.0
    layer_hi: float = 1.0


class Memory:
    """Base class. Subclasses set the class attributes and implement the methods marked abstract."""

    name: str = ""
    #: the memory's gates by name (`gates={name: [B, T, H]}` of the ops)
    gates: dict[str, Gate] = {}
    #: keys of the state that a read needs; caches keep only these
    readable_keys: tuple[str, ...] = ()
    #: True when `read` is linear in the state: then Memory Soup equals GRM exactly (SPEC §2.3)
    linear_read: bool = True
    #: True when the memory has learned initial weights (`params`) and a `mini_batch`
    deep: bool = False

    @property
    def gate_names(self) -> tuple[str, ...]:
        return tuple(self.gates)

    def default_scale(self, K: int) -> float:
        return K**-0.5

    # ---- settings and parameters -------------------------------------------------------------------------
    def check_dims(self, K: int, V: int, *, memory_depth: int = 2) -> None:
        """Raise ValueError for head dims this memory cannot take (before any parameter exists)."""

    def check(self, K: int, V: int, params: dict | None, mini_batch: int | None, H: int) -> None:
        """Raise ValueError for op arguments this memory cannot take."""
        if params is not None:
            raise ValueError(f"memory {self.name!r} has no learned initial state: pass `params=None`")

    def make_params(self, H: int, K: int, V: int, *, memory_depth: int = 2, expansion: int = 4) -> State:
        """The learned parameters of a layer (e.g. a deep memory's `W_0`), zero-filled, `{name: [H, ...]}`."""
        return {}

    def init_params(self, params, std: float = 0.02, init=torch.nn.init) -> None:
        """(Re)initialise `make_params`'s tensors in place; `init` is `torch.nn.init` or HF's
        `transformers.initialization` (which skips loaded weights)."""

    def state_numel(self, K: int, V: int, *, memory_depth: int = 2, expansion: int = 4) -> dict[str, int]:
        """Floats of one head: `{"state": the online memory, "cache": one cached memory}`."""
        raise NotImplementedError

    # ---- the recurrence --------------------------------------------------------------------------------
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

        A memory with a kernel scan adds a keyword `backend: str = "torch"` ("auto" | "torch" | "triton", see
        :mod:`mcrnn.ops.backend`); Memory Caching passes its resolved backend to the memories whose `scan`
        takes one (:func:`scan_takes_backend`) and nothing to the others.
        """
        raise NotImplementedError

    # ---- reads of many cached states (what the aggregations need) -----------------------------------------
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

    def read_cached(self, cache: State, q: torch.Tensor, scale: float) -> torch.Tensor:
        """One query against each of its own caches: cache `[B, H, N, ...]`, `q: [B, H, K]` -> `[B, H, N, V]`
        (the decode step)."""
        N = next(iter(cache.values())).shape[2]
        return self.read(cache, q.unsqueeze(2).expand(-1, -1, N, -1), scale)

    #: implements :meth:`read_weighted_spans` (then the weighted aggregations read the whole call at once)
    span_reads: bool = False

    def read_weighted_spans(self, cache: State, weights: torch.Tensor, q: torch.Tensor, spans, scale: float):
        """`Σ_p weights[..., p] · read(cache_p, q)` for a whole call: cache `[B, H, P, ...]`, weights `[B, H, T, P]`,
        `q: [B, H, T, K]`; `spans`: `(t0, t1, p0, p1)` per token block, the pool range its tokens may read (the
        weights outside it are 0) -> `[B, H, T, V]`."""
        raise NotImplementedError

    #: implements :meth:`read_selected` (then `ssc` reads only the selected caches over the whole call at once)
    selected_reads: bool = False

    def read_selected(self, cache: State, q: torch.Tensor, pick: torch.Tensor, weights: torch.Tensor,
                      valid: torch.Tensor, scale: float) -> torch.Tensor:
        """`Σ_j weights[..., j] · read(cache[pick[..., j]], q)`: cache `[B, H, P, ...]`, `q: [B, H, T, K]`,
        `pick, weights, valid: [B, H, T, k]` (pairs not `valid` have weight 0 and may be skipped) -> `[B, H, T, V]`."""
        raise NotImplementedError

    def readable(self, state: State) -> State:
        return {n: state[n] for n in self.readable_keys}

    def reads_linearly(self, state: State) -> bool:
        """Is `read` linear in this state? Then Memory Soup equals GRM exactly (SPEC §2.3)."""
        return self.linear_read

    # ---- Memory Soup over a memory whose read is not linear --------------------------------------------------
    def soup(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor], *,
        blocks: list, gamma_online: torch.Tensor, scan_kwargs: dict,
    ) -> torch.Tensor:
        """`read(Σ γ_i M_i + γ_s M_t, q_t)` for every token: the mixed states themselves are read.

        `blocks`: per token block `(t0, t1, gamma_cached [B, H, t1 - t0, n] or None, cache {name: [B, H, n,
        ...]} or None)`, covering the call in order; `gamma_online: [B, H, T]` the online memory's weight;
        `scan_kwargs`: the arguments of :meth:`scan` for the online memory. Only memories whose read is not
        linear need this hook."""
        raise NotImplementedError(f"memory {self.name!r} has no Memory Soup over non-linear reads")


@functools.cache
def _scan_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.scan).parameters)


def scan_takes_operand_dtype(memory: Memory) -> bool:
    """Does `memory.scan` take `operand_dtype` (the precision of its kernels' matmul operands)?"""
    return "operand_dtype" in _scan_parameters(type(memory))


def scan_takes_backend(memory: Memory) -> bool:
    """Does `memory.scan` take a `backend` keyword (a memory with a kernel scan)? Memories written before the
    keyword existed, and those without kernels, do not."""
    return "backend" in _scan_parameters(type(memory))
