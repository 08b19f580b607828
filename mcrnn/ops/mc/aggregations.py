"""The aggregations of Memory Caching (SPEC §2.3): how a token combines its online read with its caches.

Each aggregation is one object that declares whether its caches are scored (`<u_t, p_i>`), whether it needs
`top_k`, its per-token form (the reference loop and the decode step use it) and its block form (the parallel
path: a block of tokens against the caches visible to any of them). Adding one is one class here and one
entry in `_BY_NAME`. No aggregation looks inside a memory: reads go through the
:class:`~mcrnn.ops.memory.Memory` interface.

Shapes: heads-first, `q: [B, H, t, K]`, `u, p_on: [B, H, t, Ks]`, online reads `r: [B, H, t, V]`, visible caches
`cache: {name: [B, H, n, ...]}`, their summaries `p: [B, H, n, Ks]`, `visible: [t, n]` (bool).
"""

from __future__ import annotations

import torch

from mcrnn.ops.memory import Memory, State

#: queries per tile in the grouped reads of `ssc`
TILE = 32
#: `ssc` reads every visible cache densely (unselected ones weighted 0) while there are at most this many
#: per selected slot, or while a state has at most DENSE_SSC_STATE numbers (then routing costs more)
DENSE_SSC_RATIO = 4
DENSE_SSC_STATE = 256


class Aggregation:
    """Base class: subclasses set the flags and implement `token` and `block`."""

    name = ""
    #: the caches (and the online memory) are weighted by a softmax of scores `<u_t, p_i> · score_scale`
    scored = False
    #: needs `top_k` (how many cached memories each token reads)
    needs_top_k = False
    #: reads the caches at all (`none` does not: the parallel path then builds no caches it does not return)
    reads_caches = True
    #: mixes the states themselves (`soup`): over a memory whose read is not linear the parallel path hands the
    #: weights to the memory's `soup` hook
    mixes_states = False

    def token(self, mem: Memory, online: State, cache: State, q, r_on, z, z_on, *, scale: float, top_k) -> torch.Tensor:
        """One token (`[B, H, ...]`): `online` the readable online state, `cache` `[B, H, N, ...]`, `q: [B, H, K]`,
        `r_on: [B, H, V]` its online read, `z: [B, H, N]` / `z_on: [B, H, 1]` the scores (scored only)."""
        raise NotImplementedError

    def block(self, mem: Memory, q, u, r, p_on, visible, p, cache: State, *, scale, score_scale, top_k):
        """A block of `t` tokens against its `n` visible caches -> `[B, H, t, V]`."""
        raise NotImplementedError

    def whole_call(self, mem: Memory, q, u, r, p_on, pool_p, cache: State, visible, spans, *, scale, score_scale,
                   top_k):
        """The whole call at once instead of block by block (`visible(t0, t1) -> [t1 - t0, P]` bool over the
        pool; `spans`: `(t0, t1, p0, p1)` per token block, the pool range its tokens may see); None when this
        aggregation has no such form for this memory (then the blocks are used)."""
        return None

    def recompute_block(self, mem: Memory, n_visible: int, K: int, V: int, top_k) -> bool:
        """Recompute this block in the backward pass (checkpoint) instead of storing its activations? Linear
        reads through `weighted_matmul` store only `[t, n]` weights, so they need no recomputation."""
        return not mem.linear_read


def scores(u, p, p_on, visible, score_scale):
    """`z: [B, H, t, n]` (invisible caches at -inf) and `z_on: [B, H, t, 1]`."""
    z = (u @ p.transpose(-1, -2)) * score_scale
    z = z.masked_fill(~visible, float("-inf"))
    z_on = (u * p_on).sum(-1, keepdim=True) * score_scale
    return z, z_on


class NoAggregation(Aggregation):
    """`none`: the base RNN, only the online read."""

    name = "none"
    reads_caches = False

    def token(self, mem, online, cache, q, r_on, z, z_on, *, scale, top_k):
        return r_on

    def block(self, mem, q, u, r, p_on, visible, p, cache, *, scale, score_scale, top_k):
        return r


class Residual(Aggregation):
    """`residual`: the online read plus every visible cache's read, no parameters."""

    name = "residual"

    def token(self, mem, online, cache, q, r_on, z, z_on, *, scale, top_k):
        N = next(iter(cache.values())).shape[2]
        return r_on + mem.read_cached(cache, q, scale).sum(2) if N else r_on

    def block(self, mem, q, u, r, p_on, visible, p, cache, *, scale, score_scale, top_k):
        w = visible.to(q.dtype).expand(*q.shape[:2], *visible.shape)
        return r + mem.read_weighted(cache, w, q, scale)

    def whole_call(self, mem, q, u, r, p_on, pool_p, cache, visible, spans, *, scale, score_scale, top_k):
        if not mem.span_reads or pool_p.shape[2] == 0:
            return None
        w = visible(0, q.shape[2]).to(q.dtype).expand(*q.shape[:2], -1, -1)
        return r + mem.read_weighted_spans(cache, w, q, spans, scale)


class Mean(Aggregation):
    """`mean` (post-training MC): the uniform average of the online read and the visible caches' reads.

    With `online_weight = w` (`MCSpec.online_weight`) the online read keeps the share `w` and the `N >= 1`
    visible caches split `1 - w` evenly: `w r_s + (1 - w)/N Σ_{i<s} r_i` (no cache: `r_s`). The uniform mean is
    `w = 1/(N + 1)`, which shrinks as the context grows."""

    name = "mean"

    def __init__(self, online_weight: float | None = None):
        self.online_weight = online_weight

    def _weights(self, n_visible: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(online weight, weight of each visible cache)` for `n_visible` caches (any shape, ints)."""
        n = n_visible.to(dtype)
        if self.online_weight is None:
            return 1 / (n + 1), 1 / (n + 1)
        w = torch.where(n > 0, torch.full_like(n, self.online_weight), torch.ones_like(n))
        return w, (1 - w) / n.clamp_min(1)

    def token(self, mem, online, cache, q, r_on, z, z_on, *, scale, top_k):
        N = next(iter(cache.values())).shape[2]
        if not N:
            return r_on
        w_on, w_c = self._weights(torch.tensor(N), r_on.dtype)
        return w_on * r_on + w_c * mem.read_cached(cache, q, scale).sum(2)

    def block(self, mem, q, u, r, p_on, visible, p, cache, *, scale, score_scale, top_k):
        w_on, w_c = self._weights(visible.sum(-1, keepdim=True), q.dtype)  # [t, 1]
        w = (visible.to(q.dtype) * w_c).expand(*q.shape[:2], *visible.shape)
        return r * w_on + mem.read_weighted(cache, w, q, scale)

    def whole_call(self, mem, q, u, r, p_on, pool_p, cache, visible, spans, *, scale, score_scale, top_k):
        if not mem.span_reads or pool_p.shape[2] == 0:
            return None
        vis = visible(0, q.shape[2])
        w_on, w_c = self._weights(vis.sum(-1, keepdim=True), q.dtype)
        w = (vis.to(q.dtype) * w_c).expand(*q.shape[:2], -1, -1)
        return r * w_on + mem.read_weighted_spans(cache, w, q, spans, scale)


class GRM(Aggregation):
    """`grm` (gated residual memory): `Σ γ_i r_i`, `γ = softmax` over the caches and the online memory."""

    name = "grm"
    scored = True

    def token(self, mem, online, cache, q, r_on, z, z_on, *, scale, top_k):
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        out = gamma[..., -1:] * r_on
        if z.shape[-1]:
            out = out + (gamma[..., :-1].unsqueeze(-1) * mem.read_cached(cache, q, scale)).sum(2)
        return out

    def block(self, mem, q, u, r, p_on, visible, p, cache, *, scale, score_scale, top_k):
        z, z_on = scores(u, p, p_on, visible, score_scale)
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        return gamma[..., -1:] * r + mem.read_weighted(cache, gamma[..., :-1], q, scale)

    def whole_call(self, mem, q, u, r, p_on, pool_p, cache, visible, spans, *, scale, score_scale, top_k):
        if not mem.span_reads or pool_p.shape[2] == 0:
            return None
        z, z_on = scores(u, pool_p, p_on, visible(0, q.shape[2]), score_scale)  # [B, H, T, P], [B, H, T, 1]
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        return gamma[..., -1:] * r + mem.read_weighted_spans(cache, gamma[..., :-1], q, spans, scale)


class Soup(GRM):
    """`soup` (memory soup): `read(Σ γ_i M_i, q)`. Equal to `grm` when the memory's read is linear; otherwise
    the parallel path hands the weights to the memory's :meth:`~mcrnn.ops.memory.Memory.soup` hook."""

    name = "soup"
    mixes_states = True

    def token(self, mem, online, cache, q, r_on, z, z_on, *, scale, top_k):
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        N = z.shape[-1]
        mixed = {}
        for n, x in online.items():
            w = gamma[..., :N].view(*gamma.shape[:2], N, *([1] * (x.dim() - 2)))
            mixed[n] = (w * cache[n]).sum(2) + gamma[..., N].view(*gamma.shape[:2], *([1] * (x.dim() - 2))) * x
        return mem.read(mixed, q, scale)


class SSC(Aggregation):
    """`ssc` (sparse selective caching): the router keeps the `top_k` best-scored visible caches; `γ = softmax`
    over them and the online memory (always read). Only the selected caches are read."""

    name = "ssc"
    scored = True
    needs_top_k = True

    def token(self, mem, online, cache, q, r_on, z, z_on, *, scale, top_k):
        N = z.shape[-1]
        if N > top_k:
            z, idx = z.topk(top_k, dim=-1)  # the router: only these caches are read
            B, H = idx.shape[:2]
            # one row copy per selected state (a gather with an expanded index is ~10x slower on a CPU)
            rows = (torch.arange(B * H, device=idx.device).view(B, H, 1) * N + idx).reshape(-1)
            cache = {n: x.reshape(B * H * N, *x.shape[3:]).index_select(0, rows).view(B, H, top_k, *x.shape[3:])
                     for n, x in cache.items()}
        return GRM.token(self, mem, online, cache, q, r_on, z, z_on, scale=scale, top_k=top_k)

    #: tokens whose router scores are built at once (bounds the `[B, H, t, P]` score tensor)
    ROUTER_TOKENS = 4096

    def whole_call(self, mem, q, u, r, p_on, pool_p, cache, visible, spans, *, scale, score_scale, top_k):
        """For memories with :meth:`~mcrnn.ops.memory.Memory.read_selected`: the router runs over every token
        and the whole pool (scores `[B, H, t, P]`, a few thousand tokens at a time), then each selected cache
        reads all of its tokens at once. Reads cost `O(T · k)` states, whatever the number of caches."""
        T, P = q.shape[2], pool_p.shape[2]
        if not mem.selected_reads or P == 0 or self.dense(P, q.shape[-1], r.shape[-1], top_k):
            return None  # few caches or tiny states: the blocks' dense reads cost less than routing
        kk = min(top_k, P)
        picks, zs, z_ons = [], [], []
        for t0 in range(0, T, self.ROUTER_TOKENS):
            t1 = min(t0 + self.ROUTER_TOKENS, T)
            z, z_on = scores(u[:, :, t0:t1], pool_p, p_on[:, :, t0:t1], visible(t0, t1), score_scale)
            z, pick = z.topk(kk, dim=-1)
            picks.append(pick)
            zs.append(z)
            z_ons.append(z_on)
        z, pick, z_on = (torch.cat(x, dim=2) for x in (zs, picks, z_ons))
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        valid = torch.isfinite(z)  # fewer visible caches than top_k: the rest have weight 0
        return gamma[..., -1:] * r + mem.read_selected(cache, q, pick, gamma[..., :-1], valid, scale)

    @staticmethod
    def dense(n_visible: int, K: int, V: int, top_k: int) -> bool:
        """Few caches or tiny states: reading them all with the unselected ones weighted 0 costs less than
        routing the (token, cache) pairs into tiles; the output is the same."""
        return n_visible <= DENSE_SSC_RATIO * top_k or K * V <= DENSE_SSC_STATE

    def recompute_block(self, mem, n_visible, K, V, top_k):
        return not (mem.linear_read and self.dense(n_visible, K, V, top_k))

    def block(self, mem, q, u, r, p_on, visible, p, cache, *, scale, score_scale, top_k):
        z, z_on = scores(u, p, p_on, visible, score_scale)
        n = z.shape[-1]
        if top_k >= n:  # every visible cache is selected: GRM
            gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
            return gamma[..., -1:] * r + mem.read_weighted(cache, gamma[..., :-1], q, scale)
        z_all = z
        z, pick = z.topk(top_k, dim=-1)
        gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
        if self.dense(n, q.shape[-1], r.shape[-1], top_k):
            if mem.linear_read:
                w = torch.zeros_like(z_all).scatter(-1, pick, gamma[..., :-1])
                return gamma[..., -1:] * r + mem.read_weighted(cache, w, q, scale)
            dense = mem.read_dense(cache, q, scale)  # [B, H, t, n, V]
            reads = dense.gather(3, pick.unsqueeze(-1).expand(*pick.shape, dense.shape[-1]))
        else:
            reads = grouped_reads(mem, cache, q, pick, scale)  # [B, H, t, top_k, V]
        return gamma[..., -1:] * r + (gamma[..., :-1].unsqueeze(-1) * reads).sum(-2)


def grouped_reads(mem: Memory, cache: State, q: torch.Tensor, pick: torch.Tensor, scale: float) -> torch.Tensor:
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


_BY_NAME: dict[str, Aggregation] = {a.name: a for a in (NoAggregation(), Residual(), GRM(), Soup(), SSC(), Mean())}
#: the aggregation names, in the order of SPEC §2.3
AGGREGATIONS: tuple[str, ...] = tuple(_BY_NAME)


def get_aggregation(name: str, online_weight: float | None = None) -> Aggregation:
    """The aggregation `name`; `online_weight` configures `mean` (see :class:`Mean`)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown `aggregation` {name!r}: choose one of {list(AGGREGATIONS)}")
    if online_weight is not None:
        if name != "mean":
            raise ValueError(f"`online_weight` applies to aggregation='mean' only, got aggregation={name!r}")
        return Mean(online_weight)
    return _BY_NAME[name]
