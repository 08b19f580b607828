"""Host-side bookkeeping of one parallel call: where segments end, which caches exist and who sees them.

Everything here is plain Python over segments (never over tokens): the tensors are built by `chunk.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mcrnn.ops.mc.state import MCOptions, MCState, trailing_zeros


def check_boundaries(boundaries: Sequence[int], T: int) -> list[int]:
    """Segment end positions (exclusive ends, relative to this call's first token): strictly increasing in [1, T]."""
    try:
        ends = [int(b) for b in (boundaries.tolist() if hasattr(boundaries, "tolist") else boundaries)]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`boundaries` must be a 1-D sequence of ints (segment end positions), got {boundaries!r}"
        ) from e
    if any(isinstance(b, (list, tuple)) for b in (boundaries if isinstance(boundaries, (list, tuple)) else [])):
        raise ValueError("`boundaries` must be one 1-D list shared by the batch")
    for a, b in zip(ends, ends[1:]):
        if b <= a:
            raise ValueError(f"`boundaries` must be strictly increasing, got {ends}")
    if ends and (ends[0] < 1 or ends[-1] > T):
        raise ValueError(f"`boundaries` must lie in [1, T={T}] (exclusive segment ends), got {ends}")
    return ends


@dataclass
class Entry:
    """One cached memory of the pool (initial caches first, then the ones created by this call)."""

    vis_lo: int  # first local segment that reads it
    vis_hi: int  # first local segment that no longer reads it (merged away); n_segments if never
    level: int
    count: int
    run: int = 0  # which memory run its state comes from: 0 the online memory, l >= 1 Fenwick level l
    position: int = 0  # exclusive end of its segment (local)
    atoms: list = field(default_factory=list)  # ("carry",) | ("init", i) | ("seg", j): its key sum is their sum
    initial: int | None = None  # index in the initial state's cache


@dataclass
class Run:
    """One chunk-parallel run of the memory over the call: the online memory, or a Fenwick level."""

    resets: list[int]
    positions: list[int] = field(default_factory=list)
    final_reset: bool = False  # the run's state is M_0 after the last token (its segment completed at T)
    init_from: tuple = ("online",)  # ("online",) | ("level", i): where its initial state comes from


@dataclass
class Plan:
    seg_start: list[int]
    seg_end: list[int]
    completes: list[bool]
    continues: bool  # the first segment continues the initial state's open segment
    entries: list[Entry]
    stack: list[int]  # pool indices of the caches visible after the call, oldest first
    runs: dict[int, Run]
    units: int  # completed units after the call

    @property
    def n_segments(self) -> int:
        return len(self.seg_start)


def _cache_segment(entries: list[Entry], stack: list[int], runs: dict[int, Run], *, j: int, units: int,
                   atoms: list, count: int, vis_hi: int, end: int, log: bool, indep: bool) -> None:
    """Add the cache entry of completed segment `j` (its sequence has `units` completed units, this one
    included). With `logarithmic` it merges the lower Fenwick blocks on top of the sequence's `stack`, which
    stop being visible after segment `j`."""
    level = 0
    if log:
        level = trailing_zeros(units)
        while stack and entries[stack[-1]].level < level:
            popped = entries[stack.pop()]
            popped.vis_hi = j + 1
            atoms += popped.atoms
            count += popped.count
    run = level if (log and indep and level > 0) else 0
    runs[run].positions.append(end)
    entries.append(Entry(vis_lo=j + 1, vis_hi=vis_hi, level=level, count=count, run=run, position=end, atoms=atoms))
    stack.append(len(entries) - 1)


def make_plan(T: int, opts: MCOptions, state: MCState, boundaries: Sequence[int] | None) -> Plan:
    C = opts.segment_size
    if opts.segmentation == "boundaries":
        ends = check_boundaries(boundaries, T)
    else:
        first = C - state.seg_len
        ends = list(range(first, T + 1, C))
    starts = [0] + [e for e in ends if e < T]
    seg_end = ends + ([T] if not ends or ends[-1] < T else [])
    completes = [e in set(ends) for e in seg_end]
    n_seg = len(starts)
    continues = state.seg_len > 0
    log = opts.segmentation == "logarithmic"
    indep = opts.independent

    entries = [
        Entry(vis_lo=0, vis_hi=n_seg, level=lv, count=c, atoms=[("init", i)], initial=i)
        for i, (lv, c) in enumerate(zip(state.cache_level, state.cache_count))
    ]
    stack = list(range(len(entries)))
    units = state.units
    online = Run(resets=[s for j, s in enumerate(starts) if indep and not (j == 0 and continues)])
    runs: dict[int, Run] = {0: online}
    n_levels0 = len(state.levels)
    if log and indep:
        n_levels = max(units + sum(completes), 1).bit_length() if sum(completes) or units else 0
        for lv in range(1, n_levels + 1):
            src = ("level", lv - 1) if lv <= n_levels0 else (("level", n_levels0 - 1) if n_levels0 else ("online",))
            # level lv restarts at the start of each segment that begins a block of 2**lv units
            resets = [s for j, s in enumerate(starts)
                      if not (j == 0 and continues) and (units + j) % (1 << lv) == 0 and (units + j) > 0]
            runs[lv] = Run(resets=resets, init_from=src)

    for j in range(n_seg):
        if not completes[j]:
            continue
        units += 1
        atoms = [("seg", j)] + ([("carry",)] if j == 0 and continues else [])
        count = seg_end[j] - starts[j] + (state.seg_len if j == 0 else 0)
        _cache_segment(entries, stack, runs, j=j, units=units, atoms=atoms, count=count, vis_hi=n_seg,
                       end=seg_end[j], log=log, indep=indep)
    if completes[-1] and indep:
        online.final_reset = True
        for lv, run in runs.items():
            if lv and units % (1 << lv) == 0:
                run.final_reset = True
    return Plan(seg_start=starts, seg_end=seg_end, completes=completes, continues=continues, entries=entries,
                stack=stack, runs=runs, units=units)


def make_packed_plan(opts: MCOptions, cu_seqlens: list[int], boundaries: list | None) -> Plan:
    """The plan of a packed call from M_0 (SPEC §2.1): every sequence's segments are counted from its first
    token, the memory runs restart at every sequence start, and a cache is visible only to the later segments
    of its own sequence. One call over the packed row then computes every sequence as if it ran alone.

    `cu_seqlens`: `[0, e_1, ..., T]`; `boundaries`: None or one list of segment ends per sequence (relative to
    its first token). The plan has no final-state bookkeeping (`stack`, `units`, `final_reset`): a packed call
    that returns states runs its sequences as separate batch rows instead."""
    C = opts.segment_size
    log, indep = opts.segmentation == "logarithmic", opts.independent
    seg_start, seg_end, completes = [], [], []
    entries: list[Entry] = []
    runs: dict[int, Run] = {0: Run(resets=[])}
    for i, (s, e) in enumerate(zip(cu_seqlens, cu_seqlens[1:])):
        L = e - s
        ends = check_boundaries(boundaries[i], L) if boundaries is not None else list(range(C, L + 1, C))
        local_end = ends + ([L] if not ends or ends[-1] < L else [])
        local_start = [0] + [x for x in ends if x < L]
        first, n_seg = len(seg_start), len(local_start)
        seg_start += [s + x for x in local_start]
        seg_end += [s + x for x in local_end]
        done = set(ends)
        completes += [x in done for x in local_end]
        # the online memory restarts from M_0 at the sequence's start (and, independent, at each segment's)
        runs[0].resets += [s + x for x in (local_start if indep else [0])]
        n_done = sum(x in done for x in local_end)
        if log and indep:
            for lv in range(1, max(n_done, 1).bit_length() + 1 if n_done else 1):
                run = runs.setdefault(lv, Run(resets=[]))
                # level lv restarts at the sequence's start and at each segment that begins a block of 2**lv units
                run.resets += [s + x for j, x in enumerate(local_start) if j % (1 << lv) == 0]
        stack: list[int] = []
        units = 0
        for jj in range(n_seg):
            if not completes[first + jj]:
                continue
            units += 1
            j = first + jj
            _cache_segment(entries, stack, runs, j=j, units=units, atoms=[("seg", j)],
                           count=local_end[jj] - local_start[jj], vis_hi=first + n_seg, end=seg_end[j], log=log,
                           indep=indep)
    return Plan(seg_start=seg_start, seg_end=seg_end, completes=completes, continues=False, entries=entries,
                stack=[], runs=runs, units=0)
