"""Memory Caching, chunk-parallel: the memory runs once (chunk-parallel) over the whole call, its states at
segment ends become the caches, and the reads of the caches are aggregated block by block.

Nothing of size `T × T` is built. The reads of one block of tokens against its visible caches
(`[block, N, V]`) exist only inside that block's computation, which is recomputed in the backward pass
(`torch.utils.checkpoint`), so stored activations stay `O(T)` plus the `N` cached states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from mcrnn.ops.backend import triton_kernels
from mcrnn.ops.mc.aggregations import scores
from mcrnn.ops.mc.plan import Plan, make_packed_plan, make_plan
from mcrnn.ops.mc.spec import MCSpec
from mcrnn.ops.mc.state import (
    MCOptions,
    MCState,
    check_cu_seqlens,
    packed_boundaries,
    packed_initial_states,
    prepare_call,
    stack_states,
    state_layout,
    state_rows,
)
from mcrnn.ops.mc.step import memory_caching_step
from mcrnn.ops.memory import State, scan_takes_backend, scan_takes_operand_dtype
from mcrnn.ops.utils import to_heads_first

#: tokens per aggregation block (whole segments are grouped up to this size; longer segments are split)
BLOCK_TOKENS = 256


def memory_caching(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    memory: str = "linear",
    gates: dict[str, torch.Tensor] | None = None,
    params: dict | None = None,
    segment_size: int = 256,
    segmentation: str = "constant",
    boundaries: Sequence[int] | None = None,
    init: str = "checkpoint",
    aggregation: str = "grm",
    top_k: int | None = None,
    scale: float | None = None,
    score_scale: float | None = None,
    mini_batch: int | None = None,
    initial_state: MCState | None = None,
    output_final_state: bool = False,
    summary_keys: torch.Tensor | None = None,
    spec: MCSpec | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MCState | list[MCState] | None]:
    """Memory Caching over a recurrent memory (SPEC §2), chunk-parallel.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; u: `[B, T, H, Ks]` router/score queries (None: `u = q`, which
            needs Ks = K).
        memory: "linear" | "swla" (| "dla" | "titans" when registered).
        gates: the memory's gates by name, each `[B, T, H]` in [0, 1] (linear: `decay`; swla: `decay`,
            `prev`, `cur`); missing gates default to 1.
        params: learned initial weights of deep memories (None for linear memories).
        segment_size: tokens per segment (`constant`) or per unit (`logarithmic`).
        segmentation: "constant" | "logarithmic" | "boundaries" (then `boundaries` = segment end positions,
            exclusive, relative to this call, shared by the batch).
        init: "checkpoint" (the memory runs on; caches are snapshots) | "independent" (each segment starts
            from M_0).
        aggregation: "none" | "residual" | "grm" | "soup" | "ssc" (needs `top_k`) | "mean".
        scale: multiplies q before reading (default `K ** -0.5` for linear memories, 1 for deep ones).
        score_scale: multiplies the scores `<u_t, p_i>` (default `Ks ** -0.5`).
        mini_batch: deep memories' mini-batch size.
        initial_state: an :class:`MCState` from a previous call: the call continues that sequence.
        summary_keys: `[B, T, H, Ks]` the per-token vectors whose segment means are the summaries `p_i` of the
            scores (None: the keys `k`, Ks = K). Anything causal works, e.g. a position feature for scores that
            do not depend on what a segment wrote (`cache_scores="input"` of the layer). The state then holds
            their sums, so a continuing call must pass summary keys of the same dim.
        spec: an :class:`MCSpec` holding the settings (memory, aggregation, segment_size, segmentation, init,
            top_k, mini_batch, backend), validated once, instead of passing them one by one.
        backend: "auto" (Triton kernels for the cached reads, and for the scan of the memories that have one
            (linear, swla), of CUDA tensors when triton imports) | "torch" |
            "triton" (the kernels wherever they run: CPU tensors under `TRITON_INTERPRET=1` too) | None (the
            environment's `MCRNN_BACKEND`, else "auto"). Calls the kernels do not cover use PyTorch.
        cu_seqlens: packed sequences (fla's convention): `B == 1` and a 1-D int tensor `[0, e_1, ..., T]`;
            sequence i is tokens `[e_i, e_{i+1})` and is computed exactly as if it ran alone (SPEC §2.1).
            `initial_state` is then None, a list of n MCStates (one per sequence) or one MCState of batch n;
            `boundaries` (segmentation="boundaries") a list of n lists, each relative to its sequence's start.
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the :class:`MCState` after the last token
        (packed: a list of n MCStates of batch 1, one per sequence; `stack_states` makes one batch-n state of
        those that share a layout, e.g. sequences of equal length).
    """
    packed = None
    if cu_seqlens is not None:
        packed = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
        lengths = {b - a for a, b in zip(packed, packed[1:])}
        if initial_state is not None or output_final_state or (len(lengths) == 1 and boundaries is None):
            # per-sequence states, or sequences of one length (then this is the unpacked batch call itself): the
            # sequences run as rows of unpacked batches
            return _packed(q, k, v, u, gates, summary_keys, initial_state, boundaries, output_final_state, packed,
                           dict(memory=memory, params=params, segment_size=segment_size, segmentation=segmentation,
                                init=init, aggregation=aggregation, top_k=top_k, scale=scale,
                                score_scale=score_scale, mini_batch=mini_batch, spec=spec, backend=backend))
        if boundaries is not None:
            boundaries = packed_boundaries(boundaries, len(packed) - 1)
    opts, gates, state, dt = prepare_call(
        q, k, v, u, gates, initial_state, boundaries, summary_keys, spec=spec, memory=memory,
        aggregation=aggregation, segmentation=segmentation, segment_size=segment_size, init=init, top_k=top_k,
        scale=scale, score_scale=score_scale, params=params, mini_batch=mini_batch, backend=backend,
    )
    T = q.shape[1]
    # packed (training, scoring): one call over the row; segments, memory runs and caches restart at every
    # sequence start (`make_packed_plan`)
    plan = make_plan(T, opts, state, boundaries) if packed is None else make_packed_plan(opts, packed, boundaries)
    qh, kh, vh = (to_heads_first(x, dt) for x in (q, k, v))
    uh = to_heads_first(u, dt) if u is not None else qh
    # the vectors whose segment means are the summaries p_i: [B, H, T, Ks]
    sh = to_heads_first(summary_keys, dt) if summary_keys is not None else kh
    gh = {n: to_heads_first(g, dt) for n, g in gates.items()}
    if T == 1 and packed is None:  # decoding: the one-token step is exact and skips the parallel machinery (~5x faster)
        o, state = memory_caching_step(
            state, qh[:, :, 0], kh[:, :, 0], vh[:, :, 0], uh[:, :, 0], gates={n: g[:, :, 0] for n, g in gh.items()},
            opts=opts, end_of_segment=plan.completes[0], summary_keys=sh[:, :, 0],
        )
        return o.unsqueeze(1).to(q.dtype), (state if output_final_state else None)

    reads_caches = opts.agg.reads_caches
    need_caches = reads_caches or output_final_state
    # Memory Soup over a memory whose read is not linear mixes the online weights themselves: a second pass
    # of the online memory reads with the mix (see `_soup`); the first pass only builds the caches.
    soup = opts.agg.mixes_states and not opts.memory.reads_linearly(state.online)
    r, final_online, pool_states = _run_memories(opts, plan, state, None if soup else qh, kh, vh, gh, need_caches)
    if not reads_caches:
        o = r
    else:
        csum = _prefix_sums(sh)
        pool_key_sum, seg_sums = _key_sums(plan, state, sh, csum)
        p_on = _online_summary(plan, state, sh, csum)
        counts = torch.tensor([e.count for e in plan.entries], dtype=dt, device=q.device)
        pool_p = pool_key_sum / counts[:, None]
        if soup:
            o = _soup(opts, plan, state, qh, uh, kh, vh, gh, p_on, pool_states, pool_p)
        else:
            o = _aggregate(opts, plan, qh, uh, r, p_on, pool_states, pool_p)
    o = o.transpose(1, 2).to(q.dtype)
    if not output_final_state:
        return o, None
    if not reads_caches:
        pool_key_sum, seg_sums = _key_sums(plan, state, sh, _prefix_sums(sh))
    return o, _final_state(opts, plan, state, final_online, pool_states, pool_key_sum, seg_sums)


def _run_memories(
    opts: MCOptions, plan: Plan, state: MCState, q, k, v, gates, need_caches: bool
) -> tuple[torch.Tensor, dict, State]:
    """Run the online memory (and the Fenwick levels of independent logarithmic MC) over the call.

    Returns the online outputs `r: [B, H, T, V]`, the final states of every run and the pool of cached
    states `{name: [B, H, P, ...]}` (the initial caches, then the new ones in order of creation)."""
    mem = opts.memory
    seg_starts = [s for j, s in enumerate(plan.seg_start) if not (j == 0 and plan.continues)]
    common = dict(segment_starts=seg_starts, offset=state.seg_len, scale=opts.scale, params=opts.params,
                  mini_batch=opts.mini_batch)
    if scan_takes_backend(mem):  # a memory with a kernel scan (linear, swla): the spec's backend picks it
        common["backend"] = opts.spec.resolved_backend()
        if opts.operand_dtype is not None and scan_takes_operand_dtype(mem):
            common["operand_dtype"] = opts.operand_dtype
    finals, snaps = {}, {}
    for lv, run in plan.runs.items():
        if lv == 0:
            init = state.online
        elif run.init_from[0] == "level":
            init = state.levels[run.init_from[1]]
        else:
            init = state.online
        positions = run.positions if need_caches else []
        o, snap, final = mem.scan(q if lv == 0 else None, k, v, gates, initial=init, resets=run.resets,
                                  positions=positions, **common)
        if lv == 0:
            r = o
        finals[lv], snaps[lv] = final, snap
    new = [e for e in plan.entries if e.initial is None]
    pool = dict(state.cache)
    if need_caches and new:
        taken = {lv: 0 for lv in plan.runs}
        order = []
        for e in new:
            order.append((e.run, taken[e.run]))
            taken[e.run] += 1
        pieces = {}
        for n in pool:
            per_run = {lv: snaps[lv][n] for lv in plan.runs if snaps[lv] is not None}
            # gather the new caches in creation order across the runs
            pieces[n] = torch.stack([per_run[lv][:, :, i] for lv, i in order], dim=2)
        pool = {n: torch.cat([pool[n], pieces[n]], dim=2) for n in pool}
    return r, finals, pool


def _segment_of_tokens(plan: Plan, T: int, device) -> torch.Tensor:
    lengths = torch.tensor([e - s for s, e in zip(plan.seg_start, plan.seg_end)], device=device)
    return torch.repeat_interleave(torch.arange(plan.n_segments, device=device), lengths, output_size=T)


def _prefix_sums(k: torch.Tensor) -> torch.Tensor:
    """`[B, H, T + 1, Ks]` float64 prefix sums of the summary keys `k: [B, H, T, Ks]`: a difference of two long
    float32 prefix sums would lose the keys of a short segment late in a long sequence."""
    return torch.nn.functional.pad(k.to(torch.float64).cumsum(2), (0, 0, 1, 0))


def _key_sums(plan: Plan, state: MCState, k: torch.Tensor, csum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summary-key sums (`k: [B, H, T, Ks]`, `csum` its prefix sums) of every pool entry `[B, H, P, Ks]` and of
    every local segment `[B, H, n_seg, Ks]`."""
    starts = torch.tensor(plan.seg_start, device=k.device)
    ends = torch.tensor(plan.seg_end, device=k.device)
    # index_select, not advanced indexing: its backward is an index_add, not a sorting index_put
    seg_sums = (csum.index_select(2, ends) - csum.index_select(2, starts)).to(k.dtype)
    N0 = state.num_caches
    basis = torch.cat([state.key_sum.unsqueeze(2), state.cache_key_sum, seg_sums], dim=2)
    mix = torch.zeros(len(plan.entries), basis.shape[2], dtype=k.dtype, device=k.device)
    for i, e in enumerate(plan.entries):
        for atom in e.atoms:
            col = 0 if atom[0] == "carry" else (1 + atom[1] if atom[0] == "init" else 1 + N0 + atom[1])
            mix[i, col] = 1.0
    return torch.einsum("pa,bhak->bhpk", mix, basis), seg_sums


def _online_summary(plan: Plan, state: MCState, k: torch.Tensor, csum: torch.Tensor) -> torch.Tensor:
    """`p_s(t)`: running mean of the summary keys `k: [B, H, T, Ks]` of the token's segment up to and including
    it, `[B, H, T, Ks]`."""
    B, H, T, K = k.shape
    seg = _segment_of_tokens(plan, T, k.device)
    starts = torch.tensor(plan.seg_start, device=k.device)[seg]
    total = csum[:, :, 1:] - csum.index_select(2, starts)
    count = torch.arange(1, T + 1, device=k.device) - starts
    if plan.continues:
        first = seg == 0
        total = total + first[:, None] * state.key_sum.to(torch.float64).unsqueeze(2)
        count = count + first * state.seg_len
    return (total / count[:, None]).to(k.dtype)


def _blocks(plan: Plan, size: int = BLOCK_TOKENS) -> list[tuple[int, int, int, int]]:
    """Token blocks `(t0, t1, first segment, last segment)`: whole segments grouped up to `size` tokens;
    longer segments are split every `size` tokens from their start."""
    blocks, cur = [], None
    for j, (s, e) in enumerate(zip(plan.seg_start, plan.seg_end)):
        if e - s > size:
            if cur:
                blocks.append(cur)
                cur = None
            blocks += [(t, min(t + size, e), j, j) for t in range(s, e, size)]
        elif cur is not None and e - cur[0] <= size:
            cur = (cur[0], e, cur[2], j)
        else:
            if cur:
                blocks.append(cur)
            cur = (s, e, j, j)
    if cur:
        blocks.append(cur)
    return blocks


def _union(plan: Plan, first_segment: int, last_segment: int) -> list[int]:
    """Pool entries visible to any segment of `[first_segment, last_segment]`, in pool order."""
    return [i for i, e in enumerate(plan.entries) if e.vis_lo <= last_segment and e.vis_hi > first_segment]


def _visible_caches(plan: Plan, seg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, block):
    """The pool entries visible to any token of `block = (t0, t1, first segment, last segment)`: an index into
    the pool (a slice when they are contiguous: a view, no copy) and `visible: [t1 - t0, n]`; None if none."""
    t0, t1, sa, sb = block
    union = _union(plan, sa, sb)
    if not union:
        return None
    if union == list(range(union[0], union[-1] + 1)):
        index = slice(union[0], union[-1] + 1)
    else:
        index = torch.tensor(union, device=seg.device)
    s = seg[t0:t1, None]
    return index, (lo[index][None] <= s) & (s < hi[index][None])


def _block_iter(plan: Plan, T: int, device, size: int, tensors):
    """The one block iterator of the parallel path: yields `(block, slices of tensors, visible caches)` for
    every block of whole segments (see `_blocks`); `tensors` are `[B, H, T, ...]`, split once (per-block slices
    of autograd tensors would each zero-fill a full-size gradient)."""
    seg = _segment_of_tokens(plan, T, device)
    lo = torch.tensor([e.vis_lo for e in plan.entries], device=device, dtype=torch.long)
    hi = torch.tensor([e.vis_hi for e in plan.entries], device=device, dtype=torch.long)
    blocks = _blocks(plan, size)
    sizes = [t1 - t0 for t0, t1, _, _ in blocks]
    pieces = [x.split(sizes, dim=2) for x in tensors]
    for b, block in enumerate(blocks):
        yield block, [x[b] for x in pieces], _visible_caches(plan, seg, lo, hi, block)


def _aggregate(opts: MCOptions, plan: Plan, q, u, r, p_on, pool_states: State, pool_p) -> torch.Tensor:
    """Every token's output from its online read `r` and its visible caches, block by block (the aggregation's
    block form)."""
    agg, mem = opts.agg, opts.memory
    grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, u, r, p_on, pool_p, *pool_states.values())
    )
    T, dev = q.shape[2], q.device
    seg = _segment_of_tokens(plan, T, dev)
    lo = torch.tensor([e.vis_lo for e in plan.entries], device=dev, dtype=torch.long)
    hi = torch.tensor([e.vis_hi for e in plan.entries], device=dev, dtype=torch.long)

    def visible(t0: int, t1: int) -> torch.Tensor:  # [t1 - t0, P]: which pool entries each token sees
        s = seg[t0:t1, None]
        return (lo[None] <= s) & (s < hi[None])

    o = _triton_aggregate(opts, q, u, r, p_on, pool_states, pool_p, seg, lo, hi)
    if o is not None:
        return o

    spans = []
    for t0, t1, sa, sb in _blocks(plan):
        union = _union(plan, sa, sb)
        spans.append((t0, t1, union[0], union[-1] + 1) if union else (t0, t1, 0, 0))
    o = agg.whole_call(mem, q, u, r, p_on, pool_p, pool_states, visible, spans, scale=opts.scale,
                       score_scale=opts.score_scale, top_k=opts.top_k)
    if o is not None:
        return o
    K, V = q.shape[-1], r.shape[-1]
    fn = _AggregateBlock(opts, tuple(pool_states))
    outs = []
    for _, (q_b, u_b, r_b, p_on_b), vis in _block_iter(plan, q.shape[2], q.device, BLOCK_TOKENS, (q, u, r, p_on)):
        if vis is None:  # nothing cached yet: every aggregation reduces to the online read
            outs.append(r_b)
            continue
        index, visible = vis
        args = (q_b, u_b, r_b, p_on_b, visible, pool_p[:, :, index], *(x[:, :, index] for x in pool_states.values()))
        recompute = grad and agg.recompute_block(mem, visible.shape[1], K, V, opts.top_k)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return torch.cat(outs, dim=2)


def _triton_aggregate(opts: MCOptions, q, u, r, p_on, pool_states: State, pool_p, seg, lo, hi):
    """The cached reads in the Triton kernels (`mcrnn.ops.triton`, imported here only) when the backend asks
    for them and they cover the call (a memory read linearly from one `S: [K, V]`, a covered aggregation, dims
    and dtypes they take); None otherwise (then PyTorch computes it)."""
    if not (opts.memory.linear_read and set(pool_states) == {"S"}) or not pool_p.shape[2]:
        return None
    if opts.spec.online_weight is not None:  # the kernels weigh `mean` uniformly
        return None
    kernels = triton_kernels(opts.spec.resolved_backend(), q)
    if kernels is None:
        return None
    S = pool_states["S"]
    if kernels.unsupported_reason(q, S, opts.aggregation, u) is not None:
        return None
    kw = dict(scale=opts.scale, score_scale=opts.score_scale)
    # bf16/fp16 calls: the kernels' dots take the input's precision (their dtype follows q), accumulate in float32
    qk = q.to(opts.operand_dtype) if opts.operand_dtype is not None else q
    if opts.aggregation == "ssc":
        o = kernels.ssc_cached_read(qk, u, r, p_on, pool_p, S, seg, lo, hi, top_k=opts.top_k, **kw)
    else:
        o = kernels.cached_read(qk, u, r, p_on, pool_p, S, seg, lo, hi, aggregation=opts.aggregation, **kw)
    return o.to(q.dtype)


class _AggregateBlock:
    """One block's output (a plain callable of tensors, so that `torch.utils.checkpoint` can recompute it)."""

    def __init__(self, opts: MCOptions, names: tuple[str, ...]):
        self.opts, self.names = opts, names

    def __call__(self, q, u, r, p_on, visible, p, *cache_values):
        o = self.opts
        return o.agg.block(o.memory, q, u, r, p_on, visible, p, dict(zip(self.names, cache_values)),
                           scale=o.scale, score_scale=o.score_scale, top_k=o.top_k)


def _soup(opts: MCOptions, plan: Plan, state: MCState, q, u, k, v, gates, p_on, pool_states, pool_p) -> torch.Tensor:
    """Memory Soup over a memory whose read is not linear: the weights γ come from the scores as for GRM, and
    the memory mixes its own states with them (its :meth:`~mcrnn.ops.memory.Memory.soup` hook)."""
    B, H, T, _ = q.shape
    b = opts.mini_batch or 1
    # blocks never cut a mini-batch: long segments are split at a multiple of the mini-batch size
    size = max(b, BLOCK_TOKENS // b * b)
    blocks, gamma_on = [], []
    for (t0, t1, _, _), (u_b, p_on_b), vis in _block_iter(plan, T, q.device, size, (u, p_on)):
        if vis is None:
            gamma_on.append(u_b.new_ones(B, H, t1 - t0))
            blocks.append((t0, t1, None, None))
            continue
        index, visible = vis
        z, z_on = scores(u_b, pool_p[:, :, index], p_on_b, visible, opts.score_scale)
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        n = z.shape[-1]
        gamma_on.append(gamma[..., n])
        blocks.append((t0, t1, gamma[..., :n], {nm: x[:, :, index] for nm, x in pool_states.items()}))
    seg_starts = [s for j, s in enumerate(plan.seg_start) if not (j == 0 and plan.continues)]
    scan_kwargs = dict(initial=state.online, resets=plan.runs[0].resets, positions=[], segment_starts=seg_starts,
                       offset=state.seg_len, scale=opts.scale, params=opts.params, mini_batch=opts.mini_batch)
    return opts.memory.soup(q, k, v, gates, blocks=blocks, gamma_online=torch.cat(gamma_on, dim=2),
                            scan_kwargs=scan_kwargs)


def _final_state(opts, plan, state, finals, pool_states, pool_key_sum, seg_sums) -> MCState:
    like = state.key_sum
    m0 = opts.initial_memory(like)
    online = m0 if plan.runs[0].final_reset else finals[0]
    levels = []
    for lv in sorted(plan.runs):
        if lv:
            levels.append(m0 if plan.runs[lv].final_reset else finals[lv])
    stack = torch.tensor(plan.stack, dtype=torch.long, device=like.device)
    if plan.completes[-1]:
        key_sum, seg_len = torch.zeros_like(like), 0
    else:
        j = plan.n_segments - 1
        key_sum = seg_sums[:, :, j] + (state.key_sum if (j == 0 and plan.continues) else 0.0)
        seg_len = plan.seg_end[j] - plan.seg_start[j] + (state.seg_len if (j == 0 and plan.continues) else 0)
    return MCState(
        online=online,
        cache={n: x.index_select(2, stack) for n, x in pool_states.items()},
        cache_key_sum=pool_key_sum.index_select(2, stack),
        cache_count=[plan.entries[i].count for i in plan.stack],
        cache_level=[plan.entries[i].level for i in plan.stack],
        key_sum=key_sum,
        seg_len=seg_len,
        position=state.position + plan.seg_end[-1],
        units=plan.units,
        levels=levels,
        options=opts.signature(),
    )


def _packed(q, k, v, u, gates, summary_keys, initial_state, boundaries, output_final_state, ends, settings):
    """Packed sequences with per-sequence states, or all of one length (`ends`: the checked `cu_seqlens`): those
    of equal length, boundaries and state layout run together as one unpacked batch (rows of a batch never
    interact, so each sequence's result is exactly its result alone)."""
    n = len(ends) - 1
    states, bounds = packed_initial_states(initial_state, n), packed_boundaries(boundaries, n)
    groups: dict[tuple, list[int]] = {}
    for i, (s, e) in enumerate(zip(ends, ends[1:])):
        b = bounds[i]
        try:
            b = tuple(int(x) for x in (b.tolist() if hasattr(b, "tolist") else b)) if b is not None else None
        except (TypeError, ValueError) as err:
            raise ValueError(f"`boundaries` of sequence {i} must be a list of ints, got {b!r}") from err
        layout = state_layout(states[i]) if states[i] is not None else None
        groups.setdefault((e - s, b, layout), []).append(i)
    T, device = q.shape[1], q.device
    outs, order = [], []
    finals: list = [None] * n
    for (L, b, _), members in groups.items():
        if len(groups) == 1:  # every sequence in one group, in order: the rows are a view of the packed row
            index = None
        else:  # one gather per group (its backward is one index_add, not a zero-filled gradient per slice)
            index = torch.cat([torch.arange(ends[i], ends[i + 1], device=device) for i in members])
            order.append(index)

        g = len(members)

        def rows(x, index=index, g=g, L=L):  # [1, T, ...] -> [g, L, ...]: one row per member
            if x is None:
                return None
            return (x if index is None else x.index_select(1, index)).reshape(g, L, *x.shape[2:])

        init = [states[i] for i in members]
        o, st = memory_caching(
            rows(q), rows(k), rows(v), rows(u),
            gates={name: rows(g) for name, g in gates.items()} if isinstance(gates, dict) else gates,
            summary_keys=rows(summary_keys), boundaries=list(b) if b is not None else None,
            initial_state=stack_states(init) if init[0] is not None else None,
            output_final_state=output_final_state, **settings,
        )
        outs.append(o.reshape(1, -1, *o.shape[2:]))
        if output_final_state:
            for i, row in zip(members, state_rows(st)):
                finals[i] = row
    if len(groups) == 1:
        return outs[0], (finals if output_final_state else None)
    # back to packed order: the token at packed position order[j] is row j of the concatenated outputs
    inverse = torch.empty(T, dtype=torch.long, device=device)
    inverse[torch.cat(order)] = torch.arange(T, device=device)
    return torch.cat(outs, dim=1).index_select(1, inverse), (finals if output_final_state else None)
