"""`MCConfig`: the configuration of the mcrnn models (Memory Caching RNNs, attention and hybrids)."""

from __future__ import annotations

import warnings

from transformers import PretrainedConfig

from mcrnn.ops import MCSpec

MIXERS = ("mc", "attention")
#: segmentations a model can use (explicit `boundaries` are per call, so they are for the op, not a config)
MODEL_SEGMENTATIONS = ("constant", "logarithmic")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class MCConfig(PretrainedConfig):
    """Configuration of :class:`~mcrnn.models.MCForCausalLM`.

    Llama-style blocks: pre-RMSNorm token mixer + residual, pre-RMSNorm SwiGLU MLP + residual.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_heads: the usual sizes.
        mixer: "mc" (Memory Caching over `memory`) or "attention" (causal softmax attention with RoPE), or a
            list with one of them per layer (hybrids).
        memory: "linear" | "swla" | "dla" | "titans" | "delta" | "gdn" (any memory in `mcrnn.ops.MEMORIES`).
        aggregation: "none" (the base RNN) | "residual" | "grm" | "soup" | "ssc" (needs `top_k`) | "mean".
        segment_size, segmentation ("constant" | "logarithmic"), init ("checkpoint" | "independent"),
            top_k, mini_batch (deep memories; `segment_size` must be a multiple of it): see
            :func:`mcrnn.ops.mc`.
        intermediate_size: SwiGLU hidden size (default: 8/3 · hidden_size rounded up to a multiple of 32).
        head_dim: K per head (default hidden_size // num_heads); expand_v: V = head_dim · expand_v.
        expansion: hidden size of the deep memories' MLP in units of K; memory_depth: 2 (MLP) or 1 (linear).
        use_u: a separate projection for the score queries `u` (else `u = q`).
        cache_scores: "context" (scores `<u_t, p_i>` with `p_i` the mean key of segment i, SPEC §2.3) or
            "input" (the ablation of context-dependent gates: `p_i` is segment i's mean position over
            `segment_size` and `u_t` one scalar per head; scored aggregations only, needs `use_u`).
        allow_neg_eigval: the delta rule's `beta` in [0, 2] instead of [0, 1] (negative eigenvalues).
        online_weight: `mean` only: the online read's share of the output (the caches split the rest evenly)
            instead of the uniform `1/(N + 1)` (None).
        fixed_gates: names of the memory's gates held at their default instead of learned (e.g. `["decay"]`:
            linear attention without decay, a base that forgets nothing).
        backend: where the cached reads run: "auto" | "torch" | "triton" | None (the environment's
            `MCRNN_BACKEND`, else "auto"; see :class:`mcrnn.ops.MCSpec`).
        conv_size: kernel of the short convolution; norm_eps: RMSNorm epsilon.
        max_position_embeddings, rope_theta: RoPE of the attention layers.
        attention_conv_size: kernel of a short convolution on the attention layers' q, k, v, the one the Memory
            Caching layers have (0: none, the plain Transformer).
    """

    model_type = "mcrnn"
    attribute_map = {"num_attention_heads": "num_heads"}

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_heads: int = 8,
        mixer: str | list[str] = "mc",
        memory: str = "linear",
        aggregation: str = "grm",
        segment_size: int = 256,
        segmentation: str = "constant",
        init: str = "checkpoint",
        top_k: int | None = None,
        mini_batch: int = 16,
        intermediate_size: int | None = None,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        expansion: int = 4,
        memory_depth: int = 2,
        use_u: bool = True,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        ssc_top_k: int | None = None,
        cache_scores: str = "context",
        backend: str | None = None,
        allow_neg_eigval: bool = False,
        fixed_gates: list[str] | None = None,
        online_weight: float | None = None,
        attention_conv_size: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.mixer = list(mixer) if isinstance(mixer, (list, tuple)) else mixer
        self.memory = memory
        self.aggregation = aggregation
        self.segment_size = segment_size
        self.segmentation = segmentation
        self.init = init
        if ssc_top_k is not None:  # configs saved before `top_k` had its own name
            warnings.warn("`ssc_top_k` is deprecated: use `top_k`", FutureWarning, stacklevel=2)
            top_k = ssc_top_k if top_k is None else top_k
        self.top_k = top_k
        self.mini_batch = mini_batch
        if intermediate_size is None and _is_int(hidden_size):
            intermediate_size = 32 * ((8 * hidden_size // 3 + 31) // 32)
        self.intermediate_size = intermediate_size
        if head_dim is None and _is_int(hidden_size) and _is_int(num_heads) and num_heads > 0:
            head_dim = hidden_size // num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.expansion = expansion
        self.memory_depth = memory_depth
        self.use_u = use_u
        self.cache_scores = cache_scores
        self.backend = backend
        self.allow_neg_eigval = allow_neg_eigval
        self.online_weight = online_weight
        self.fixed_gates = list(fixed_gates) if isinstance(fixed_gates, (list, tuple)) else (fixed_gates or [])
        self.conv_size = conv_size
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.attention_conv_size = attention_conv_size
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
            eos_token_id=eos_token_id, **kwargs,
        )
        self.validate()

    # `top_k` (the SSC router size) is a generation parameter's name too: transformers refuses to save a model
    # config holding generation parameters, so the check skips it (`MCPreTrainedModel` keeps it out of the
    # generation config as well)
    def _get_generation_parameters(self) -> dict:
        params = super()._get_generation_parameters()
        params.pop("top_k", None)
        return params

    # ---- derived -----------------------------------------------------------------------------------------
    @property
    def layer_mixers(self) -> list[str]:
        """The mixer of each layer."""
        if isinstance(self.mixer, list):
            return list(self.mixer)
        return [self.mixer] * self.num_hidden_layers

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def mc_spec(self) -> MCSpec:
        """The Memory Caching settings of the MC layers, validated (:class:`mcrnn.ops.MCSpec`)."""
        return MCSpec(memory=self.memory, aggregation=self.aggregation, segment_size=self.segment_size,
                      segmentation=self.segmentation, init=self.init, top_k=self.top_k, mini_batch=self.mini_batch,
                      cache_scores=self.cache_scores, use_u=self.use_u, memory_depth=self.memory_depth,
                      expansion=self.expansion, backend=self.backend,
                      allow_neg_eigval=self.allow_neg_eigval,
                      fixed_gates=tuple(self.fixed_gates) if isinstance(self.fixed_gates, list) else self.fixed_gates,
                      online_weight=self.online_weight)

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad field. Called on construction and by the model (so that
        fields changed after construction, e.g. by `from_pretrained(path, aggregation=...)`,
        are checked too). The Memory Caching settings are checked by :class:`mcrnn.ops.MCSpec`."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size",
                     "head_dim", "conv_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if isinstance(self.mixer, list):
            if len(self.mixer) != self.num_hidden_layers:
                raise ValueError(
                    f"`mixer` as a list needs one entry per layer: got {len(self.mixer)} entries for "
                    f"num_hidden_layers={self.num_hidden_layers}"
                )
            bad = [m for m in self.mixer if m not in MIXERS]
        else:
            bad = [self.mixer] if self.mixer not in MIXERS else []
        if bad:
            raise ValueError(f"unknown `mixer` {bad[0]!r}: choose one of {list(MIXERS)} (or a list of them)")
        spec = self.mc_spec
        if spec.segmentation not in MODEL_SEGMENTATIONS:
            raise ValueError(
                f"unknown `segmentation` {self.segmentation!r}: a model takes one of "
                f"{list(MODEL_SEGMENTATIONS)} "
                "(explicit boundaries are per call: use mcrnn.ops.memory_caching)"
            )
        ev = self.expand_v
        if not isinstance(ev, (int, float)) or isinstance(ev, bool) or ev <= 0:
            raise ValueError(f"`expand_v` must be a positive number, got {self.expand_v!r}")
        if self.head_v_dim < 1 or self.head_dim * self.expand_v != self.head_v_dim:
            raise ValueError(
                f"`expand_v` ({self.expand_v}) times head_dim ({self.head_dim}) must be an integer >= 1"
            )
        acs = self.attention_conv_size
        if not _is_int(acs) or acs < 0:
            raise ValueError(f"`attention_conv_size` must be an integer >= 0 (0: no short convolution), got {acs!r}")
        for name in ("norm_eps", "initializer_range", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}")
        if "attention" in self.layer_mixers and self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for the RoPE of attention layers, got {self.head_dim}")
        if "mc" in self.layer_mixers:
            spec.check_dims(self.head_dim, self.head_v_dim)
