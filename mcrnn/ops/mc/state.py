"""The complete decode state of a Memory Caching op, and the options shared by its implementations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mcrnn.ops.mc.aggregations import Aggregation
from mcrnn.ops.mc.spec import MCSpec, resolve_spec
from mcrnn.ops.memory import Memory, State
from mcrnn.ops.utils import check_gate, check_qkv, compute_dtype, default_scale


@dataclass
class MCState:
    """Everything needed to continue a sequence: pass it back as `initial_state`.

    Tensors have a leading batch dim (so a beam-search reorder is `state.map(lambda x: x[idx])`); the rest are
    Python ints shared by the batch. `N` is the number of cached memories currently visible.

    Attributes:
        online: the online memory's state, `{name: [B, H, ...]}`.
        cache: the cached memories (only what a read needs), `{name: [B, H, N, ...]}`.
        cache_key_sum: `[B, H, N, Ks]` sum of the summary keys of each cached segment (its summary `p_i` is
            the mean); the summary keys are the keys `k` (Ks = K) unless the call passed `summary_keys`.
        cache_count: tokens in each cached segment, length N.
        cache_level: Fenwick level of each cache (`logarithmic`; 0 otherwise), length N.
        key_sum: `[B, H, Ks]` sum of the summary keys of the open segment so far.
        seg_len: tokens of the open segment so far.
        position: tokens consumed so far.
        units: segments (units, for `logarithmic`) completed so far.
        levels: `logarithmic` + `independent`: the running memory of each Fenwick level 1, 2, ...
            (level 0 is `online`); each restarts from M_0 every 2**level units.
        options: the settings that produced the state; continuing with other settings is an error.
    """

    online: State
    cache: State
    cache_key_sum: torch.Tensor
    cache_count: list[int] = field(default_factory=list)
    cache_level: list[int] = field(default_factory=list)
    key_sum: torch.Tensor | None = None
    seg_len: int = 0
    position: int = 0
    units: int = 0
    levels: list[State] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    @property
    def num_caches(self) -> int:
        return len(self.cache_count)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MCState:
        """A new state with `fn` applied to every tensor (e.g. `lambda x: x.index_select(0, beam_idx)`)."""
        return dataclasses.replace(
            self,
            online={n: fn(x) for n, x in self.online.items()},
            cache={n: fn(x) for n, x in self.cache.items()},
            cache_key_sum=fn(self.cache_key_sum),
            key_sum=fn(self.key_sum),
            cache_count=list(self.cache_count),
            cache_level=list(self.cache_level),
            levels=[{n: fn(x) for n, x in lv.items()} for lv in self.levels],
        )

    def detach(self) -> MCState:
        return self.map(torch.Tensor.detach)


@dataclass
class MCOptions:
    """One call's settings: the validated :class:`MCSpec` plus what the call's tensors decide (scales, dims,
    the deep memories' parameters). Shared by the parallel path, the reference and the decode step."""

    spec: MCSpec
    scale: float
    score_scale: float
    params: dict | None
    key_dim: int
    value_dim: int
    summary_dim: int
    #: the call's input dtype when it is bf16/fp16: the kernels' matmul operands (with float32 accumulation,
    #: as fla does), while PyTorch computes in float32; None for float32/float64 inputs
    operand_dtype: torch.dtype | None = None

    @property
    def memory(self) -> Memory:
        return self.spec.mem

    @property
    def agg(self) -> Aggregation:
        return self.spec.agg

    @property
    def aggregation(self) -> str:
        return self.spec.aggregation

    @property
    def segmentation(self) -> str:
        return self.spec.segmentation

    @property
    def segment_size(self) -> int:
        return self.spec.segment_size

    @property
    def init(self) -> str:
        return self.spec.init

    @property
    def top_k(self) -> int | None:
        return self.spec.top_k

    @property
    def mini_batch(self) -> int | None:
        return self.spec.mini_batch

    @property
    def independent(self) -> bool:
        return self.spec.independent

    def initial_memory(self, like: torch.Tensor) -> State:
        """M_0 for a batch: `like` is any `[B, H, ...]` tensor of the compute dtype."""
        return self.memory.init_state(like.shape[0], like.shape[1], self.key_dim, self.value_dim, like, self.params)

    def signature(self) -> dict:
        return self.spec.signature()


def make_options(
    *, spec: MCSpec | None = None, scale: float | None, score_scale: float | None, params: dict | None,
    boundaries: Sequence[int] | None, K: int, V: int, H: int, Ks: int | None = None, **settings,
) -> MCOptions:
    """The options of one call: `spec` (or the settings to build it from: memory, aggregation, segmentation,
    segment_size, init, top_k, mini_batch) checked against the call's dims and data. `Ks` is the dim of the
    summary keys and of `u` (default K: the summaries are the keys')."""
    spec = resolve_spec(spec, **settings)
    Ks = K if Ks is None else Ks
    if spec.segmentation == "boundaries" and boundaries is None:
        raise ValueError("segmentation='boundaries' needs `boundaries` (segment end positions)")
    if boundaries is not None and spec.segmentation != "boundaries":
        raise ValueError(
            f"`boundaries` was given but segmentation={spec.segmentation!r}: use segmentation='boundaries'"
        )
    mem = spec.mem
    mem.check(K, V, params, spec.mini_batch, H)
    return MCOptions(
        spec=spec, scale=default_scale(scale, K, mem.default_scale(K)), score_scale=default_scale(score_scale, Ks),
        params=params, key_dim=K, value_dim=V, summary_dim=Ks,
    )


def check_gates(gates: dict | None, memory: Memory, B: int, T: int, H: int) -> dict[str, torch.Tensor]:
    gates = {} if gates is None else gates
    if not isinstance(gates, dict):
        raise ValueError(f"`gates` must be a dict of [B, T, H] tensors by name, got {type(gates).__name__}")
    unknown = set(gates) - set(memory.gate_names)
    if unknown:
        raise ValueError(
            f"`gates` has unknown names {sorted(unknown)} for memory {memory.name!r}: "
            f"it takes {list(memory.gate_names)}"
        )
    for name, g in gates.items():
        check_gate(name, g, B, T, H, hi=memory.gates[name].hi)
    return gates


def initial_mc_state(
    opts: MCOptions, B: int, H: int, K: int, V: int, like: torch.Tensor
) -> MCState:
    mem = opts.memory
    m0 = mem.init_state(B, H, K, V, like, opts.params)
    empty = {n: x.new_zeros(x.shape[:2] + (0,) + x.shape[2:]) for n, x in mem.readable(m0).items()}
    Ks = opts.summary_dim
    return MCState(
        online=m0, cache=empty, cache_key_sum=like.new_zeros(B, H, 0, Ks), key_sum=like.new_zeros(B, H, Ks),
        options=opts.signature(),
    )


def check_initial_state(state: MCState, opts: MCOptions, B: int, H: int, Ks: int, dtype: torch.dtype) -> MCState:
    """The state to continue from, checked against this call (`Ks`: the dim of its summary keys)."""
    if not isinstance(state, MCState):
        raise ValueError(
            f"`initial_state` must be the MCState returned with output_final_state=True, got {type(state).__name__}"
        )
    if state.options != opts.signature():
        raise ValueError(
            f"`initial_state` was produced with {state.options}, but this call uses {opts.signature()}: "
            "continue a sequence with the same memory, segmentation, segment_size and init"
        )
    if tuple(state.key_sum.shape) != (B, H, Ks):
        raise ValueError(
            f"`initial_state` holds batch/heads/key dims {tuple(state.key_sum.shape)}, expected {(B, H, Ks)} "
            "(the last is the dim of the summary keys: `summary_keys` if given, else `k`)"
        )
    return state.map(lambda x: x.to(dtype))


def zero_state_like(state: State) -> State:
    return {n: torch.zeros_like(x) for n, x in state.items()}


def trailing_zeros(n: int) -> int:
    return (n & -n).bit_length() - 1


def check_summary_keys(
    q: torch.Tensor, u: torch.Tensor | None, summary_keys: torch.Tensor | None, B: int, T: int, H: int, K: int
) -> int:
    """Check `u` against the summary keys (`summary_keys: [B, T, H, Ks]`, None: the keys, Ks = K); return Ks."""
    if summary_keys is None:
        if u is not None and (not isinstance(u, torch.Tensor) or tuple(u.shape) != (B, T, H, K)):
            raise ValueError(f"`u` must have the shape of `q` {tuple(q.shape)}, got {getattr(u, 'shape', u)}")
        return K
    s = summary_keys
    if not isinstance(s, torch.Tensor) or s.dim() != 4 or tuple(s.shape[:3]) != (B, T, H) or s.shape[3] < 1:
        raise ValueError(
            f"`summary_keys` must have shape [B, T, H, Ks] = [{B}, {T}, {H}, Ks] with Ks >= 1, "
            f"got {getattr(s, 'shape', type(s).__name__)}"
        )
    if not s.is_floating_point() or s.device != q.device:
        raise ValueError(f"`summary_keys` must be a floating-point tensor on q's device, got {s.dtype} on {s.device}")
    Ks = s.shape[3]
    if u is None and Ks != K:
        raise ValueError(
            f"`u` is required with `summary_keys` of dim Ks={Ks} != K={K}: the default `u = q` has dim K, "
            "and the scores are <u, p_i> with p_i of dim Ks"
        )
    if u is not None and (not isinstance(u, torch.Tensor) or tuple(u.shape) != (B, T, H, Ks)):
        raise ValueError(
            f"`u` must have shape [B, T, H, Ks] = {(B, T, H, Ks)} (Ks: the last dim of `summary_keys`), "
            f"got {getattr(u, 'shape', u)}"
        )
    return Ks


def prepare_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor | None, gates: dict | None,
    initial_state: MCState | None, boundaries: Sequence[int] | None, summary_keys: torch.Tensor | None = None,
    **settings,
) -> tuple[MCOptions, dict[str, torch.Tensor], MCState, torch.dtype]:
    """The checks and set-up shared by every Memory Caching entry point: validated options, gates, the
    state to start from (fresh or continued, in the compute dtype) and the compute dtype."""
    B, T, H, K, V = check_qkv(q, k, v)
    Ks = check_summary_keys(q, u, summary_keys, B, T, H, K)
    opts = make_options(**settings, boundaries=boundaries, K=K, V=V, H=H, Ks=Ks)
    if q.dtype in (torch.bfloat16, torch.float16):
        opts.operand_dtype = q.dtype
    gates = check_gates(gates, opts.memory, B, T, H)
    dt = compute_dtype(q)
    if initial_state is None:
        state = initial_mc_state(opts, B, H, K, V, q.new_zeros((), dtype=dt))
    else:
        state = check_initial_state(initial_state, opts, B, H, Ks, dt)
    return opts, gates, state, dt



# ---- packed sequences (`cu_seqlens`, SPEC §2.1) -------------------------------------------------------------


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> list[int]:
    """`cu_seqlens`: a 1-D integer tensor (or list) `[0, e_1, ..., e_n = T]`, strictly increasing, with `B == 1`
    (fla's convention). Returns it as a list of ints."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex() \
                or cu_seqlens.dtype == torch.bool:
            raise ValueError(
                f"`cu_seqlens` must be a 1-D integer tensor [0, e_1, ..., T], got dtype {cu_seqlens.dtype} "
                f"and shape {tuple(cu_seqlens.shape)}"
            )
        ends = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                         for x in cu_seqlens):
        ends = list(cu_seqlens)
    else:
        raise ValueError(f"`cu_seqlens` must be a 1-D integer tensor [0, e_1, ..., T], got {cu_seqlens!r}")
    if B != 1:
        raise ValueError(f"`cu_seqlens` needs the sequences packed into one row (B == 1), got B = {B}: "
                         "flatten the batch to [1, B * T] and list every row's start in `cu_seqlens`")
    if len(ends) < 2 or ends[0] != 0 or ends[-1] != T:
        raise ValueError(f"`cu_seqlens` must start at 0 and end at T = {T} (at least one sequence), got {ends}")
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"`cu_seqlens` must be strictly increasing (no empty sequences), got {ends}")
    return ends


def state_layout(state: MCState) -> tuple:
    """The Python (batch-shared) part of a state: rows of equal layout can be stacked into one batch."""
    return (state.seg_len, state.position, state.units, tuple(state.cache_count), tuple(state.cache_level),
            len(state.levels), tuple(sorted(state.options.items())))


def state_rows(state: MCState) -> list[MCState]:
    """Split a batch-`B` state into `B` states of batch 1 (views)."""
    return [state.map(lambda x, i=i: x[i:i + 1]) for i in range(state.key_sum.shape[0])]


def stack_states(states: Sequence[MCState]) -> MCState:
    """One batch-`n` state from `n` states of the same layout (same lengths of open segment, caches, options).

    Packed calls return one state per sequence; sequences of equal length (and equal history) stack, and the
    stacked state continues them with an unpacked `B = n` call."""
    states = list(states)
    if not states or any(not isinstance(s, MCState) for s in states):
        raise ValueError("`stack_states` takes a non-empty list of MCState")
    layouts = {state_layout(s) for s in states}
    if len(layouts) > 1:
        raise ValueError(
            "these states cannot be stacked into one batch: they differ in their open segment, caches or "
            "options (sequences of different lengths); continue them with a packed call (a list of states)"
        )
    first = states[0]
    cat = lambda xs: torch.cat(list(xs), dim=0)  # noqa: E731
    return dataclasses.replace(
        first,
        online={n: cat(s.online[n] for s in states) for n in first.online},
        cache={n: cat(s.cache[n] for s in states) for n in first.cache},
        cache_key_sum=cat(s.cache_key_sum for s in states),
        key_sum=cat(s.key_sum for s in states),
        cache_count=list(first.cache_count),
        cache_level=list(first.cache_level),
        levels=[{n: cat(s.levels[i][n] for s in states) for n in lv} for i, lv in enumerate(first.levels)],
    )


def packed_initial_states(initial_state, n: int) -> list[MCState | None]:
    """The initial state of each of the `n` packed sequences: None (each starts from M_0), a list of `n`
    MCStates of batch 1 (what a packed call returns), or one MCState of batch `n` (one row per sequence)."""
    if initial_state is None:
        return [None] * n
    if isinstance(initial_state, MCState):
        rows = initial_state.key_sum.shape[0]
        if rows != n:
            raise ValueError(f"a packed call's `initial_state` needs one row per sequence: {n} rows, got {rows}")
        return state_rows(initial_state)
    if isinstance(initial_state, (list, tuple)) and len(initial_state) == n:
        for s in initial_state:
            if not isinstance(s, MCState) or s.key_sum.shape[0] != 1:
                raise ValueError("a packed call's `initial_state` list must hold one MCState of batch 1 per sequence")
        return list(initial_state)
    raise ValueError(
        f"a packed call's `initial_state` must be None, a list of {n} MCStates (one per sequence, as a packed "
        f"call returns them) or one MCState with {n} rows, got {type(initial_state).__name__}"
    )


def packed_boundaries(boundaries, n: int) -> list:
    """Per-sequence segment ends of a packed call: a list of `n` lists, each relative to its sequence's start."""
    if boundaries is None:
        return [None] * n
    if isinstance(boundaries, torch.Tensor) or not isinstance(boundaries, (list, tuple)) or len(boundaries) != n \
            or not all(isinstance(b, (list, tuple, torch.Tensor)) for b in boundaries):
        raise ValueError(
            f"with `cu_seqlens`, `boundaries` must be a list of {n} lists (each sequence's segment ends, relative "
            "to its first token)"
        )
    return list(boundaries)
