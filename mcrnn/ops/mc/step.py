"""The one-token decode step of Memory Caching: advances an :class:`MCState` by one token.

It uses the aggregations' per-token form; the parallel path (`chunk.py`) uses their block form, and the
reference (`naive.py`) has a token loop of its own, so that the tests compare independent implementations.
"""

from __future__ import annotations

import dataclasses

import torch

from mcrnn.ops.mc.state import MCOptions, MCState, trailing_zeros

__all__ = ["memory_caching_step"]


def _aggregate(
    opts: MCOptions, state: MCState, q: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Output of one token from the online memory and the N caches (SPEC §2.3). `q: [B, H, K]`, `u: [B, H, Ks]`
    (Ks: the dim of the summary keys, whose sums the state holds)."""
    mem, agg = opts.memory, opts.agg
    online = mem.readable(state.online)
    r_on = mem.read(online, q, opts.scale)  # [B, H, V]
    z = z_on = None
    if agg.scored:  # z_i = <u, p_i> · score_scale, p_i the mean of segment i's summary keys
        N = state.num_caches
        p_on = state.key_sum / state.seg_len
        z_on = (u * p_on).sum(-1, keepdim=True) * opts.score_scale  # [B, H, 1]
        if N:
            counts = torch.tensor(state.cache_count, dtype=q.dtype, device=q.device)
            p = state.cache_key_sum / counts[:, None]  # [B, H, N, Ks]
            z = (p @ u.unsqueeze(-1)).squeeze(-1) * opts.score_scale  # [B, H, N]
        else:
            z = z_on[..., :0]
    return agg.token(mem, online, state.cache, q, r_on, z, z_on, scale=opts.scale, top_k=opts.top_k)


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


