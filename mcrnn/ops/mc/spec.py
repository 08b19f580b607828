"""`MCSpec`: the settings of Memory Caching, validated once, from a model config down to the op.

`MCConfig` builds one, `MemoryCachingAttention` builds (or takes) one, `memory_caching` takes one (or builds it
from its keyword arguments). Every check of these settings lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mcrnn.ops.backend import BACKENDS, resolve_backend
from mcrnn.ops.mc.aggregations import AGGREGATIONS, Aggregation, get_aggregation
from mcrnn.ops.memory import Memory
from mcrnn.ops.registry import get_memory

SEGMENTATIONS = ("constant", "logarithmic", "boundaries")
INITS = ("checkpoint", "independent")
#: what the scores of the cached memories see: "context" = `<u_t, p_i>` with `p_i` the mean key of segment i
#: (SPEC §2.3); "input" = `u_t · (mean position of segment i) / segment_size` (the ablation of the paper's
#: context-dependent gates: the weights depend on the current token and the segments' age only)
CACHE_SCORES = ("context", "input")
MEMORY_DEPTHS = (1, 2)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class MCSpec:
    """Validated settings of Memory Caching over one memory.

    Attributes:
        memory: a name in :data:`mcrnn.ops.MEMORIES` ("linear", "swla", "dla", "titans", ...).
        aggregation: "none" | "residual" | "grm" | "soup" | "ssc" (needs `top_k`) | "mean".
        segment_size: tokens per segment (`constant`) or per unit (`logarithmic`).
        segmentation: "constant" | "logarithmic" | "boundaries" (explicit per-call segment ends).
        init: "checkpoint" (the memory runs on) | "independent" (each segment starts from M_0).
        top_k: `ssc`: how many cached memories each token reads.
        mini_batch: deep memories' mini-batch (None: 1 for deep memories; ignored by the others).
        cache_scores: "context" | "input" (layers only; scored aggregations, needs `use_u`).
        use_u: layers only: a separate projection for the score queries `u` (else `u = q`).
        memory_depth, expansion: layers only: the deep memories' MLP (depth 1 or 2, hidden `expansion · K`).
        allow_neg_eigval: layers only: gates whose ops accept more than [0, 1] (the delta rule's `beta` in
            [0, 2]: negative eigenvalues of `I − β k kᵀ`) are produced over their full range.
        online_weight: `mean` only: the online read's share of the output (the caches split the rest evenly)
            instead of the uniform `1/(N + 1)`; None: uniform.
        fixed_gates: layers only: names of the memory's gates that are not learned but held at the value an op
            uses when the gate is not given (`Gate.default`; e.g. `("decay",)`: linear attention without decay).
        backend: "auto" | "torch" | "triton" | None (the environment's `MCRNN_BACKEND`, else "auto"): where the
            cached reads and the base memory's scan run (see :mod:`mcrnn.ops.backend`).
    """

    memory: str = "linear"
    aggregation: str = "grm"
    segment_size: int = 256
    segmentation: str = "constant"
    init: str = "checkpoint"
    top_k: int | None = None
    mini_batch: int | None = None
    cache_scores: str = "context"
    use_u: bool = True
    memory_depth: int = 2
    expansion: int = 4
    allow_neg_eigval: bool = False
    backend: str | None = None
    fixed_gates: tuple[str, ...] = ()
    online_weight: float | None = None

    def __post_init__(self):
        get_memory(self.memory)  # ValueError naming `memory`
        get_aggregation(self.aggregation)  # ValueError naming `aggregation`
        w = self.online_weight
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
                raise ValueError(f"`online_weight` must be a number in (0, 1], got {w!r}")
            get_aggregation(self.aggregation, float(w))  # ValueError unless aggregation='mean'
            object.__setattr__(self, "online_weight", float(w))
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"unknown `segmentation` {self.segmentation!r}: choose one of {list(SEGMENTATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown `init` {self.init!r}: choose one of {list(INITS)}")
        if not _is_int(self.segment_size) or self.segment_size < 1:
            raise ValueError(f"`segment_size` must be an integer >= 1, got {self.segment_size!r}")
        if self.agg.needs_top_k and self.top_k is None:
            raise ValueError(
                f"`top_k` is required for aggregation={self.aggregation!r} (how many cached memories each token reads)"
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"`top_k` must be an integer >= 1, got {self.top_k!r}")
        if self.mini_batch is not None and (not _is_int(self.mini_batch) or self.mini_batch < 1):
            raise ValueError(f"`mini_batch` must be an integer >= 1, got {self.mini_batch!r}")
        if self.mem.deep:
            if self.mini_batch is None:
                object.__setattr__(self, "mini_batch", 1)
            if self.segmentation != "boundaries" and self.segment_size % self.mini_batch:
                raise ValueError(
                    f"`segment_size` ({self.segment_size}) must be a multiple of `mini_batch` ({self.mini_batch}) "
                    f"for memory={self.memory!r}, so that mini-batches do not straddle segments"
                )
        else:
            object.__setattr__(self, "mini_batch", None)  # only deep memories have mini-batches
        if self.cache_scores not in CACHE_SCORES:
            raise ValueError(f"unknown `cache_scores` {self.cache_scores!r}: choose one of {list(CACHE_SCORES)}")
        if self.cache_scores == "input":
            scored = [n for n in AGGREGATIONS if get_aggregation(n).scored]
            if not self.agg.scored:
                raise ValueError(
                    f"`cache_scores='input'` needs a scored aggregation {scored}, got "
                    f"aggregation={self.aggregation!r} (its caches have no scores): use cache_scores='context'"
                )
            if not self.use_u:
                raise ValueError(
                    "`cache_scores='input'` needs `use_u=True`: its score query is one scalar per head, "
                    "`u = q` cannot be"
                )
        if not isinstance(self.use_u, bool):
            raise ValueError(f"`use_u` must be a bool, got {self.use_u!r}")
        if self.memory_depth not in MEMORY_DEPTHS:
            raise ValueError(f"`memory_depth` must be 1 or 2, got {self.memory_depth!r}")
        if not _is_int(self.expansion) or self.expansion < 1:
            raise ValueError(f"`expansion` must be an integer >= 1, got {self.expansion!r}")
        if not isinstance(self.allow_neg_eigval, bool):
            raise ValueError(f"`allow_neg_eigval` must be a bool, got {self.allow_neg_eigval!r}")
        fixed = self.fixed_gates
        if isinstance(fixed, str) or not isinstance(fixed, (list, tuple)):
            raise ValueError(f"`fixed_gates` must be a list of gate names, got {fixed!r}")
        unknown = [g for g in fixed if g not in self.mem.gates]
        if unknown:
            raise ValueError(f"`fixed_gates`: memory {self.memory!r} has no gate {unknown[0]!r} (its gates: "
                             f"{list(self.mem.gates)})")
        object.__setattr__(self, "fixed_gates", tuple(dict.fromkeys(fixed)))
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown `backend` {self.backend!r}: choose one of {list(BACKENDS)} (or None)")

    def resolved_backend(self) -> str:
        """The backend of a call: the spec's, else the environment's `MCRNN_BACKEND`, else "auto"."""
        return resolve_backend(self.backend)

    @classmethod
    def from_kwargs(cls, **kwargs) -> MCSpec:
        """Build a spec from keyword arguments (those that are not spec fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names})

    def replace(self, **changes) -> MCSpec:
        """A new validated spec with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def mem(self) -> Memory:
        return get_memory(self.memory)

    @property
    def agg(self) -> Aggregation:
        return get_aggregation(self.aggregation, self.online_weight)

    @property
    def independent(self) -> bool:
        return self.init == "independent"

    @property
    def scored(self) -> bool:
        """Do the cached memories have scores `<u, p_i>` (and so a layer a `u` projection)?"""
        return self.agg.scored

    def check_dims(self, K: int, V: int) -> None:
        """Head dims this spec's memory can take (e.g. the residual MLP needs K == V)."""
        self.mem.check_dims(K, V, memory_depth=self.memory_depth)

    def signature(self) -> dict:
        """The settings a continued sequence must share (see `MCState.options`)."""
        return {"memory": self.memory, "segmentation": self.segmentation, "segment_size": self.segment_size,
                "init": self.init}


#: the op's defaults for the settings a spec holds (`memory_caching`'s keyword arguments)
OP_DEFAULTS = dict(memory="linear", aggregation="grm", segment_size=256, segmentation="constant", init="checkpoint",
                   top_k=None, mini_batch=None, backend=None)


def resolve_spec(spec: MCSpec | None, **settings) -> MCSpec:
    """The spec of an op call: `spec` as given (then the settings must be left at their defaults), or one built
    from the settings."""
    if spec is None:
        return MCSpec.from_kwargs(**settings)
    if not isinstance(spec, MCSpec):
        raise ValueError(f"`spec` must be an mcrnn.ops.MCSpec, got {type(spec).__name__}")
    changed = sorted(n for n, x in settings.items() if x != OP_DEFAULTS.get(n))
    if changed:
        raise ValueError(f"pass either `spec` or the settings {changed}, not both")
    return spec
