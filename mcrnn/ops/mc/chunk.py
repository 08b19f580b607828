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

from mcrnn.ops.mc.naive import memory_caching_step
from mcrnn.ops.mc.plan import Plan, make_plan
from mcrnn.ops.mc.state import MCOptions, MCState, prepare_call
from mcrnn.ops.memories import Memory, State, weighted_matmul
from mcrnn.ops.utils import to_heads_first

#: tokens per aggregation block (whole segments are grouped up to this size; longer segments are split)
BLOCK_TOKENS = 256
#: queries per tile in the grouped reads of `ssc`
TILE = 32
#: `ssc` reads every visible cache densely (unselected ones weighted 0) while there are at most this many
#: per selected slot, or while a state has at most DENSE_SSC_STATE numbers (then routing costs more)
DENSE_SSC_RATIO = 4
DENSE_SSC_STATE = 256


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
) -> tuple[torch.Tensor, MCState | None]:
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
    Returns:
        `o: [B, T, H, V]` in q's dtype and, if `output_final_state`, the :class:`MCState` after the last token.
    """
    opts, gates, state, dt = prepare_call(
        q, k, v, u, gates, initial_state, boundaries, summary_keys, memory=memory, aggregation=aggregation,
        segmentation=segmentation, segment_size=segment_size, init=init, top_k=top_k, scale=scale,
        score_scale=score_scale, params=params, mini_batch=mini_batch,
    )
    T = q.shape[1]
    plan = make_plan(T, opts, state, boundaries)
    qh, kh, vh = (to_heads_first(x, dt) for x in (q, k, v))
    uh = to_heads_first(u, dt) if u is not None else qh
    # the vectors whose segment means are the summaries p_i: [B, H, T, Ks]
    sh = to_heads_first(summary_keys, dt) if summary_keys is not None else kh
    gh = {n: to_heads_first(g, dt) for n, g in gates.items()}
    if T == 1:  # decoding: the one-token step is exact and skips the parallel machinery (~5x faster)
        o, state = memory_caching_step(
            state, qh[:, :, 0], kh[:, :, 0], vh[:, :, 0], uh[:, :, 0], gates={n: g[:, :, 0] for n, g in gh.items()},
            opts=opts, end_of_segment=plan.completes[0], summary_keys=sh[:, :, 0],
        )
        return o.unsqueeze(1).to(q.dtype), (state if output_final_state else None)

    need_caches = opts.aggregation != "none" or output_final_state
    # Memory Soup over a memory whose read is not linear mixes the online weights themselves: a second pass
    # of the online memory reads with the mix (see `_soup`); the first pass only builds the caches.
    soup = opts.aggregation == "soup" and not opts.memory.reads_linearly(state.online)
    r, final_online, pool_states = _run_memories(opts, plan, state, None if soup else qh, kh, vh, gh, need_caches)
    if opts.aggregation == "none":
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
    if opts.aggregation == "none":
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
    seg_sums = (csum[:, :, ends] - csum[:, :, starts]).to(k.dtype)
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
    total = csum[:, :, 1:] - csum[:, :, starts]
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


def _aggregate(opts, plan, q, u, r, p_on, pool_states, pool_p) -> torch.Tensor:
    B, H, T, _ = q.shape
    dev = q.device
    seg = _segment_of_tokens(plan, T, dev)
    lo = torch.tensor([e.vis_lo for e in plan.entries], device=dev, dtype=torch.long)
    hi = torch.tensor([e.vis_hi for e in plan.entries], device=dev, dtype=torch.long)
    grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, u, r, p_on, pool_p, *pool_states.values())
    )
    K, V = q.shape[-1], r.shape[-1]
    blocks = _blocks(plan)
    sizes = [t1 - t0 for t0, t1, _, _ in blocks]
    # split once: per-block slices of autograd tensors would each zero-fill a full-size gradient
    pieces = [x.split(sizes, dim=2) for x in (q, u, r, p_on)]
    names = tuple(pool_states)
    outs = []
    for b, (t0, t1, sa, sb) in enumerate(blocks):
        q_b, u_b, r_b, p_on_b = (x[b] for x in pieces)
        union = [i for i, e in enumerate(plan.entries) if e.vis_lo <= sb and e.vis_hi > sa]
        if not union:  # nothing cached yet: every aggregation reduces to the online read
            outs.append(r_b)
            continue
        if union == list(range(union[0], union[-1] + 1)):
            index = slice(union[0], union[-1] + 1)  # a view of the pool, no copy
        else:
            index = torch.tensor(union, device=dev)
        s = seg[t0:t1, None]
        visible = (lo[index][None] <= s) & (s < hi[index][None])  # [t, n]
        n = len(union)
        dense_ssc = opts.aggregation == "ssc" and (n <= DENSE_SSC_RATIO * opts.top_k or K * V <= DENSE_SSC_STATE)
        # Linear reads through `weighted_matmul` store only [t, n] weights per block: no recomputation needed.
        # Other reads (SSC's grouped reads, deep memories) are recomputed in the backward pass.
        recompute = grad and not (opts.memory.linear_read and (opts.aggregation != "ssc" or dense_ssc))
        fn = _AggregateBlock(opts, names, dense_ssc)
        args = (q_b, u_b, r_b, p_on_b, visible, pool_p[:, :, index], *(x[:, :, index] for x in pool_states.values()))
        outs.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return torch.cat(outs, dim=2)


class _AggregateBlock:
    """The output of one block of tokens from its online reads and its visible caches (SPEC §2.3)."""

    def __init__(self, opts: MCOptions, names: tuple[str, ...], dense_ssc: bool = False):
        self.opts, self.names, self.dense_ssc = opts, names, dense_ssc

    def __call__(self, q, u, r, p_on, visible, p, *cache_values):
        opts, mem = self.opts, self.opts.memory
        cache = dict(zip(self.names, cache_values))
        agg = opts.aggregation
        if agg in ("residual", "mean"):
            w = visible.to(q.dtype).expand(*q.shape[:2], *visible.shape)
            if agg == "mean":
                n_read = (visible.sum(-1, keepdim=True) + 1).to(q.dtype)  # the caches + the online memory
                w, r = w / n_read, r / n_read
            return r + mem.read_weighted(cache, w, q, opts.scale)
        z = (u @ p.transpose(-1, -2)) * opts.score_scale  # [B, H, t, n]
        z = z.masked_fill(~visible, float("-inf"))
        z_on = (u * p_on).sum(-1, keepdim=True) * opts.score_scale
        if agg == "ssc" and opts.top_k < z.shape[-1]:
            z_all = z
            z, pick = z.topk(opts.top_k, dim=-1)
            gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
            if self.dense_ssc:
                # few caches or tiny states: reading them all with the unselected ones weighted 0 costs less
                # than routing the pairs into tiles; the output is the same (only the selected reads enter it)
                if mem.linear_read:
                    w = torch.zeros_like(z_all).scatter(-1, pick, gamma[..., :-1])
                    return gamma[..., -1:] * r + mem.read_weighted(cache, w, q, opts.scale)
                dense = mem.read_dense(cache, q, opts.scale)  # [B, H, t, n, V]
                reads = dense.gather(3, pick.unsqueeze(-1).expand(*pick.shape, dense.shape[-1]))
            else:
                reads = _grouped_reads(mem, cache, q, pick, opts.scale)  # [B, H, t, top_k, V]
            return gamma[..., -1:] * r + (gamma[..., :-1].unsqueeze(-1) * reads).sum(-2)
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        return gamma[..., -1:] * r + mem.read_weighted(cache, gamma[..., :-1], q, opts.scale)


def _soup(opts, plan, state, q, u, k, v, gates, p_on, pool_states, pool_p) -> torch.Tensor:
    """Memory Soup over an MLP memory: `y = x + (Σ γ_i W1_i) gelu((Σ γ_i W2_i) x)`, `x = scale · q`.

    The cached part of the mix is a weighted GEMM per block (no per-token weights); the online `W2_t x_t`
    and `W1_t z_t` come from a second pass of the online memory (`SoupMix` is its hook)."""
    B, H, T, K = q.shape
    dev = q.device
    seg = _segment_of_tokens(plan, T, dev)
    lo = torch.tensor([e.vis_lo for e in plan.entries], device=dev, dtype=torch.long)
    hi = torch.tensor([e.vis_hi for e in plan.entries], device=dev, dtype=torch.long)
    b = opts.mini_batch
    # blocks never cut a mini-batch: long segments are split at a multiple of the mini-batch size
    blocks = _blocks(plan, max(b, BLOCK_TOKENS // b * b))
    sizes = [t1 - t0 for t0, t1, _, _ in blocks]
    x = q * opts.scale
    pieces = [y.split(sizes, dim=2) for y in (x, u, p_on)]
    gamma_on, hidden, per_block = [], [], []
    for i, (t0, t1, sa, sb) in enumerate(blocks):
        x_b, u_b, p_on_b = (y[i] for y in pieces)
        union = [j for j, e in enumerate(plan.entries) if e.vis_lo <= sb and e.vis_hi > sa]
        if not union:
            gamma_on.append(x_b.new_ones(B, H, t1 - t0))
            hidden.append(None)
            per_block.append(None)
            continue
        index = torch.tensor(union, device=dev)
        s = seg[t0:t1, None]
        visible = (lo[index][None] <= s) & (s < hi[index][None])
        z = ((u_b @ pool_p[:, :, index].transpose(-1, -2)) * opts.score_scale).masked_fill(~visible, float("-inf"))
        z_on = (u_b * p_on_b).sum(-1, keepdim=True) * opts.score_scale
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        n = len(union)
        W1, W2 = pool_states["W1"][:, :, index], pool_states["W2"][:, :, index]  # [B, H, n, V, E], [.., E, K]
        W2T = W2.transpose(-1, -2).reshape(B, H, n * K, -1)
        W1T = W1.transpose(-1, -2).reshape(B, H, n * W1.shape[-1], -1)
        gamma_on.append(gamma[..., n])
        hidden.append(weighted_matmul(gamma[..., :n], x_b, W2T))  # Σ_{i<s} γ_i W2_i x
        per_block.append((t0, gamma[..., :n], W1T))
    E = pool_states["W2"].shape[-2]
    hidden = [h if h is not None else x.new_zeros(B, H, sz, E) for h, sz in zip(hidden, sizes)]
    mix = SoupMix(blocks, torch.cat(gamma_on, dim=2), torch.cat(hidden, dim=2), per_block)
    mem = opts.memory
    seg_starts = [s for j, s in enumerate(plan.seg_start) if not (j == 0 and plan.continues)]
    o, _, _ = mem.scan(q, k, v, gates, initial=state.online, resets=plan.runs[0].resets, positions=[],
                       segment_starts=seg_starts, offset=state.seg_len, scale=opts.scale, params=opts.params,
                       mini_batch=opts.mini_batch, mix=mix)
    return o


class SoupMix:
    """The hook a deep memory's scan calls per mini-batch to mix its online weights with the caches.

    `hidden(i, h)`: `h = W2_t x_t` of mini-batch `i`'s tokens `[B, H, b, E]` -> `gelu(γ_s h + Σ γ_i W2_i x)`;
    `output(i, x, z, w1z)`: `w1z = W1_t z` -> `x + γ_s w1z + Σ γ_i W1_i z`."""

    def __init__(self, blocks, gamma_on, hidden, per_block):
        self.block_starts = [t0 for t0, _, _, _ in blocks]
        self.gamma_on, self.hidden_cached, self.per_block = gamma_on, hidden, per_block

    def prepare(self, idx: torch.Tensor) -> None:
        """`idx: [n_mb, b]` token rows of the mini-batches (padding = T)."""
        import bisect

        pad = lambda y: torch.cat([y, torch.zeros_like(y[:, :, :1])], dim=2)
        # gather once and unbind: per-mini-batch indexing would zero-fill a full-size gradient each time
        self.g_on = pad(self.gamma_on)[:, :, idx].unbind(2)
        self.h_c = pad(self.hidden_cached)[:, :, idx].unbind(2)
        self.rows = idx
        self.block_of = [bisect.bisect_right(self.block_starts, int(t)) - 1 for t in idx[:, 0].tolist()]

    def hidden(self, i: int, h: torch.Tensor) -> torch.Tensor:
        from mcrnn.ops.deep import gelu

        return gelu(self.g_on[i].unsqueeze(-1) * h + self.h_c[i])

    def output(self, i: int, x: torch.Tensor, z: torch.Tensor, w1z: torch.Tensor) -> torch.Tensor:
        out = x + self.g_on[i].unsqueeze(-1) * w1z
        blk = self.per_block[self.block_of[i]]
        if blk is None:
            return out
        t0, gamma, W1T = blk
        local = (self.rows[i] - t0).clamp(0, gamma.shape[2] - 1)  # padding rows read anything; dropped later
        return out + weighted_matmul(gamma[:, :, local], z, W1T)


def _grouped_reads(mem: Memory, cache: State, q: torch.Tensor, pick: torch.Tensor, scale: float) -> torch.Tensor:
    """Reads of only the selected caches: `pick: [B, H, t, k]` indexes cache dim 2 -> `[B, H, t, k, V]`.

    The (query, cache) pairs are sorted by cache and packed into tiles of TILE queries sharing one cache, so
    each selected state is read by a dense `[TILE, K] x state` product instead of being copied per token."""
    B, H, t, kk = pick.shape
    N = next(iter(cache.values())).shape[2]
    K = q.shape[-1]
    dev = q.device
    bh = torch.arange(B * H, device=dev).view(B, H, 1, 1)
    key = (bh * N + pick).reshape(-1)  # which (batch, head, cache) each pair reads
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    groups, counts = torch.unique_consecutive(sorted_key, return_counts=True)
    tiles_per = (counts + TILE - 1) // TILE
    first_tile = torch.cumsum(tiles_per, 0) - tiles_per
    first_pair = torch.cumsum(counts, 0) - counts
    group_of = torch.repeat_interleave(torch.arange(len(groups), device=dev), counts)
    rank = torch.arange(key.numel(), device=dev) - first_pair[group_of]
    tile, slot = first_tile[group_of] + rank // TILE, rank % TILE
    n_tiles = int(tiles_per.sum())
    q_pairs = q.unsqueeze(3).expand(B, H, t, kk, K).reshape(-1, K)[order]
    q_tiles = q.new_zeros(n_tiles, TILE, K).index_put((tile, slot), q_pairs)
    tile_state = torch.repeat_interleave(groups, tiles_per, output_size=n_tiles)
    states = {n: x.reshape(B * H * N, *x.shape[3:])[tile_state] for n, x in cache.items()}
    out = mem.read_groups(states, q_tiles, scale)[tile, slot]  # [pairs, V] in sorted order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=dev)
    return out[inverse].view(B, H, t, kk, -1)


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
