"""Token-loop reference for Memory Caching, literally SPEC §2 (reference only: the tests compare the parallel
path and the decode step against it, so it shares no code with them beyond the memory's and the aggregation's
per-token forms)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mcrnn.ops.mc.plan import check_boundaries
from mcrnn.ops.mc.spec import MCSpec
from mcrnn.ops.mc.state import (
    MCOptions,
    MCState,
    check_cu_seqlens,
    packed_boundaries,
    packed_initial_states,
    prepare_call,
    trailing_zeros,
)

__all__ = ["naive_memory_caching"]


def _aggregate(
    opts: MCOptions, state: MCState, q: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Output of one token from the online memory and the N caches (SPEC §2.3). `q: [B, H, K]`, `u: [B, H, Ks]`."""
    mem, agg, N = opts.memory, opts.agg, state.num_caches
    online = mem.readable(state.online)
    r_on = mem.read(online, q, opts.scale)  # [B, H, V]
    if not agg.scored:
        return agg.token(mem, online, state.cache, q, r_on, None, None, scale=opts.scale, top_k=opts.top_k)
    # scores z_i = <u, p_i> / sqrt(Ks), p = the mean of the segment's summary keys; the online p_s is the running
    # mean of the open segment's
    p_on = state.key_sum / state.seg_len
    z_on = (u * p_on).sum(-1, keepdim=True) * opts.score_scale  # [B, H, 1]
    if N:
        counts = torch.tensor(state.cache_count, dtype=q.dtype, device=q.device)
        p = state.cache_key_sum / counts[:, None]  # [B, H, N, Ks]
        z = torch.einsum("bhk,bhnk->bhn", u, p) * opts.score_scale
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


def _reference_step(
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
    spec: MCSpec | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MCState | list[MCState] | None]:
    """Memory Caching one token at a time (the reference; `backend` is accepted for the shared signature and
    has no effect here). Same contract as :func:`memory_caching`."""
    if cu_seqlens is not None:
        # packed: literally one call per sequence (SPEC §2.1: each sequence is a sequence of its own)
        ends = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
        n = len(ends) - 1
        states, bounds = packed_initial_states(initial_state, n), packed_boundaries(boundaries, n)
        outs, finals = [], []
        for i, (s, e) in enumerate(zip(ends, ends[1:])):
            cut = lambda x, s=s, e=e: x[:, s:e] if x is not None else None  # noqa: E731
            o_i, st_i = naive_memory_caching(
                cut(q), cut(k), cut(v), cut(u), memory=memory,
                gates={n_: cut(g) for n_, g in gates.items()} if isinstance(gates, dict) else gates, params=params,
                segment_size=segment_size, segmentation=segmentation, boundaries=bounds[i], init=init,
                aggregation=aggregation, top_k=top_k, scale=scale, score_scale=score_scale, mini_batch=mini_batch,
                initial_state=states[i], output_final_state=output_final_state, summary_keys=cut(summary_keys),
                spec=spec,
            )
            outs.append(o_i)
            finals.append(st_i)
        return torch.cat(outs, dim=1), (finals if output_final_state else None)
    opts, gates, state, dt = prepare_call(
        q, k, v, u, gates, initial_state, boundaries, summary_keys, spec=spec, memory=memory,
        aggregation=aggregation, segmentation=segmentation, segment_size=segment_size, init=init, top_k=top_k,
        scale=scale, score_scale=score_scale, params=params, mini_batch=mini_batch, backend=backend,
    )
    T = q.shape[1]
    ends = _boundary_set(boundaries, T) if segmentation == "boundaries" else None
    outs = []
    for t in range(T):
        o_t, state = _reference_step(
            state, q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt), u[:, t].to(dt) if u is not None else None,
            gates={n: g[:, t].to(dt) for n, g in gates.items()}, opts=opts,
            end_of_segment=(t + 1 in ends) if ends is not None else None,
            summary_keys=summary_keys[:, t].to(dt) if summary_keys is not None else None,
        )
        outs.append(o_t)
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (state if output_final_state else None)


def _boundary_set(boundaries: Sequence[int], T: int) -> set[int]:
    return set(check_boundaries(boundaries, T))
