"""Token-loop reference for Memory Caching, literally SPEC §2, and the one-token decode step it is built on."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mcrnn.ops.mc.state import MCOptions, MCState, prepare_call, trailing_zeros

__all__ = ["naive_memory_caching", "memory_caching_step"]


def _aggregate(
    opts: MCOptions, state: MCState, q: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Output of one token from the online memory and the N caches (SPEC §2.3). `q: [B, H, K]`, `u: [B, H, Ks]`
    (Ks: the dim of the summary keys, whose sums the state holds)."""
    mem = opts.memory
    r_on = mem.read(mem.readable(state.online), q, opts.scale)  # [B, H, V]
    agg, N = opts.aggregation, state.num_caches
    if agg == "none":
        return r_on
    reads = mem.read(state.cache, q.unsqueeze(2).expand(-1, -1, N, -1), opts.scale) if N else None  # [B, H, N, V]
    if agg == "residual":
        return r_on + (reads.sum(2) if N else 0.0)
    if agg == "mean":
        return (r_on + (reads.sum(2) if N else 0.0)) / (N + 1)
    # grm, soup, ssc: scores z_i = <u, p_i> / sqrt(Ks); p = mean of the segment's summary keys
    counts = torch.tensor(state.cache_count, dtype=q.dtype, device=q.device)
    p = state.cache_key_sum / counts[:, None] if N else None  # [B, H, N, Ks]
    p_on = state.key_sum / state.seg_len
    z_on = (u * p_on).sum(-1, keepdim=True) * opts.score_scale  # [B, H, 1]
    z = torch.einsum("bhk,bhnk->bhn", u, p) * opts.score_scale if N else z_on[..., :0]
    if agg == "ssc" and N > opts.top_k:
        z, idx = z.topk(opts.top_k, dim=-1)  # the router: only these caches are read
        cache = {n: x.gather(2, idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(-1, -1, -1, *x.shape[3:]))
                 for n, x in state.cache.items()}
        reads = reads.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, reads.shape[-1]))
    else:
        cache = state.cache
    gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)  # the online memory takes part
    if agg == "soup":
        # read(Σ γ_i M_i, q): mix the states themselves
        mixed = {}
        for n, x in mem.readable(state.online).items():
            w = gamma[..., :N].view(*gamma.shape[:2], N, *([1] * (x.dim() - 2)))
            mixed[n] = (w * cache[n]).sum(2) + gamma[..., N].view(*gamma.shape[:2], *([1] * (x.dim() - 2))) * x
        return mem.read(mixed, q, opts.scale)
    out = gamma[..., -1:] * r_on
    if reads is not None and reads.shape[2]:
        out = out + (gamma[..., :-1].unsqueeze(-1) * reads).sum(2)
    return out


def _complete_segment(opts: MCOptions, st: MCState) -> None:
    """Cache the segment that just ended (in place on the state's fields)."""
    mem = opts.memory
    st.units += 1
    key_sum, count, level = st.key_sum, st.seg_len, 0
    n_pop = 0
    if opts.segmentation == "logarithmic":
        level = trailing_zeros(st.units)
        # the blocks of lower level are merged into the new block of `level` (Fenwick partition)
        while n_pop < st.num_caches and st.cache_level[-1 - n_pop] < level:
            n_pop += 1
        if n_pop:
            key_sum = key_sum + st.cache_key_sum[:, :, -n_pop:].sum(2)
            count += sum(st.cache_count[-n_pop:])
    source = st.online if (level == 0 or not opts.independent) else st.levels[level - 1]
    snap = mem.readable(source)
    keep = st.num_caches - n_pop
    st.cache = {n: torch.cat([x[:, :, :keep], snap[n].unsqueeze(2)], dim=2) for n, x in st.cache.items()}
    st.cache_key_sum = torch.cat([st.cache_key_sum[:, :, :keep], key_sum.unsqueeze(2)], dim=2)
    st.cache_count = st.cache_count[:keep] + [count]
    st.cache_level = st.cache_level[:keep] + [level]
    if opts.independent:
        m0 = opts.initial_memory(st.key_sum)
        if opts.segmentation == "logarithmic" and level == len(st.levels):
            # a new top level starts as the memory of everything so far, then runs on without restarting
            st.levels.append(dict(source))
        for lv in range(1, level + 1):
            st.levels[lv - 1] = dict(m0)
        st.online = m0
    st.key_sum = torch.zeros_like(st.key_sum)
    st.seg_len = 0


def memory_caching_step(
    state: MCState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    gates: dict[str, torch.Tensor] | None = None,
    opts: MCOptions,
    end_of_segment: bool | None = None,
    summary_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MCState]:
    """Advance the state by one token and return its output.

    `q, k: [B, H, K]`, `v: [B, H, V]`, `u, summary_keys: [B, H, Ks]` (None: `u = q`, the summary keys are
    `k`), gates `{name: [B, H]}`, all in the state's dtype (not checked here: :func:`memory_caching` with
    T = 1 checks them). `end_of_segment` overrides the segmentation's rule (explicit boundaries); None means:
    a segment ends every `segment_size` tokens. Returns `o: [B, H, V]` and the new state (the input state is
    not modified).
    """
    mem = opts.memory
    st = dataclasses.replace(state, cache_count=list(state.cache_count), cache_level=list(state.cache_level),
                             levels=list(state.levels))
    gates = gates or {}
    kw = dict(params=opts.params, mini_batch=opts.mini_batch)
    st.online = mem.step(st.online, k, v, gates, seg_pos=st.seg_len, **kw)
    if st.levels:
        # level l's segment is a block of 2**l units; it started `units % 2**l` units ago
        st.levels = [
            mem.step(lv, k, v, gates, seg_pos=((st.units % (1 << i)) * opts.segment_size + st.seg_len), **kw)
            for i, lv in enumerate(st.levels, start=1)
        ]
    st.key_sum = st.key_sum + (k if summary_keys is None else summary_keys)
    st.seg_len += 1
    st.position += 1
    o = _aggregate(opts, st, q, u if u is not None else q)
    if end_of_segment is None:
        end_of_segment = opts.segmentation != "boundaries" and st.seg_len == opts.segment_size
    if end_of_segment:
        _complete_segment(opts, st)
    return o, st


def naive_memory_caching(
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
    """Memory Caching one token at a time (the reference). Same contract as :func:`memory_caching`."""
    opts, gates, state, dt = prepare_call(
        q, k, v, u, gates, initial_state, boundaries, summary_keys, memory=memory, aggregation=aggregation,
        segmentation=segmentation, segment_size=segment_size, init=init, top_k=top_k, scale=scale,
        score_scale=score_scale, params=params, mini_batch=mini_batch,
    )
    T = q.shape[1]
    ends = _boundary_set(boundaries, T) if segmentation == "boundaries" else None
    outs = []
    for t in range(T):
        o_t, state = memory_caching_step(
            state, q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt), u[:, t].to(dt) if u is not None else None,
            gates={n: g[:, t].to(dt) for n, g in gates.items()}, opts=opts,
            end_of_segment=(t + 1 in ends) if ends is not None else None,
            summary_keys=summary_keys[:, t].to(dt) if summary_keys is not None else None,
        )
        outs.append(o_t)
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (state if output_final_state else None)


def _boundary_set(boundaries: Sequence[int], T: int) -> set[int]:
    from mcrnn.ops.mc.plan import check_boundaries

    return set(check_boundaries(boundaries, T))
