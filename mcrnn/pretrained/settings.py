"""The Memory Caching settings of an adapted pretrained model, as stored in its config (`config.memory_caching`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: the aggregations the adapters accept (SPEC §2.3); the scored ones read `u` (a learned `u_proj`, or `u = q`)
AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc", "mean")
SCORED = ("grm", "soup", "ssc")
#: `boundaries` is a per-call op argument with no model-level meaning, so the adapters do not offer it
SEGMENTATIONS = ("constant", "logarithmic")
INITS = ("checkpoint", "independent")

#: the key under which the settings live in the model's config (and its `config.json`)
CONFIG_KEY = "memory_caching"


@dataclass(frozen=True)
class MCSettings:
    """How the recurrence of every adapted mixer runs (the arguments of :func:`mcrnn.ops.memory_caching`).

    `use_u`: scored aggregations score the cached memories with `u = x W_u` (a trainable `u_proj` per mixer)
    if True, with `u = q` (no new parameters) if False. `u_init_std`: the scale of `u` at initialisation
    (the weights of `u_proj` are `N(0, u_init_std² / hidden_size)`), small so that the mixing weights start
    close to uniform; it is not read again once the weights exist.
    """

    aggregation: str
    segment_size: int
    segmentation: str = "constant"
    init: str = "checkpoint"
    top_k: int | None = None
    use_u: bool = True
    u_init_std: float = 1e-2

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown `aggregation` {self.aggregation!r}: choose one of {list(AGGREGATIONS)}")
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(
                f"unsupported `segmentation` {self.segmentation!r} for a pretrained model: choose one of "
                f"{list(SEGMENTATIONS)} ('boundaries' is a per-call argument of mcrnn.ops.memory_caching)"
            )
        if self.init not in INITS:
            raise ValueError(f"unknown `init` {self.init!r}: choose one of {list(INITS)}")
        if not _is_int(self.segment_size) or self.segment_size < 1:
            raise ValueError(f"`segment_size` must be an integer >= 1, got {self.segment_size!r}")
        if self.aggregation == "ssc":
            if self.top_k is None:
                raise ValueError(
                    "`top_k` is required for aggregation='ssc' (how many cached memories each token reads)"
                )
            if not _is_int(self.top_k) or self.top_k < 1:
                raise ValueError(f"`top_k` must be an integer >= 1, got {self.top_k!r}")
        elif self.top_k is not None:
            raise ValueError(f"`top_k` is only read by aggregation='ssc', got top_k={self.top_k!r} with "
                             f"aggregation={self.aggregation!r}: drop `top_k`")
        if not isinstance(self.use_u, bool):
            raise ValueError(f"`use_u` must be True or False, got {self.use_u!r}")
        if not isinstance(self.u_init_std, (int, float)) or isinstance(self.u_init_std, bool) \
                or not 0 <= self.u_init_std < float("inf"):
            raise ValueError(f"`u_init_std` must be a finite number >= 0, got {self.u_init_std!r}")

    @property
    def has_u_proj(self) -> bool:
        """Whether each mixer owns a trainable score projection `u_proj` (the MC parameters)."""
        return self.use_u and self.aggregation in SCORED

    def op_kwargs(self) -> dict:
        """The settings as keyword arguments of :func:`mcrnn.ops.memory_caching`."""
        return dict(aggregation=self.aggregation, segment_size=self.segment_size, segmentation=self.segmentation,
                    init=self.init, top_k=self.top_k)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MCSettings:
        if not isinstance(d, dict):
            raise ValueError(f"`config.{CONFIG_KEY}` must be a dict of Memory Caching settings, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"`config.{CONFIG_KEY}` has unknown keys {sorted(unknown)}: it takes {sorted(known)} "
                "(was it written by a newer mcrnn?)"
            )
        return cls(**d)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
