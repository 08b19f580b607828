"""The Memory Caching token mixer (SPEC §3) over any registered memory and aggregation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcrnn.layers.cache import MCCache
from mcrnn.layers.utils import RMSNorm, ShortConvolution, check_padding_mask
from mcrnn.ops import AGGREGATIONS, INITS, get_memory, memory_caching

#: aggregations that score the cached memories with `u` (the others have no parameters)
SCORED = ("grm", "soup", "ssc")

#: what the scores of the cached memories see: "context" = `<u_t, p_i>` with `p_i` the mean key of segment i
#: (SPEC §2.3); "input" = `u_t · (mean position of segment i) / segment_size` (the ablation of the paper's
#: context-dependent gates: the weights depend on the current token and the segments' age only)
CACHE_SCORES = ("context", "input")

#: initial bias of each gate: the gates start near "remember" (decay, prev/cur near 1, forgetting near 0)
GATE_BIAS = {"decay": 3.0, "prev": 3.0, "cur": 3.0, "lr": 0.0, "momentum": 0.0, "forget": -3.0}

#: gate values on padded tokens: together with zero keys and values they leave the memory unchanged (left
#: padding). `titans` momentum: 0 keeps a zero momentum at zero; mid-sequence padding resets the momentum.
GATE_ON_PAD = {"decay": 1.0, "prev": 0.0, "cur": 0.0, "lr": 0.0, "momentum": 0.0, "forget": 0.0}


class GateLinear(nn.Linear):
    """`x -> [.., heads]` logits of one gate; `bias_init` is the bias it is (re)initialised to."""

    def __init__(self, in_features: int, heads: int, bias_init: float = 0.0):
        self.bias_init = bias_init
        super().__init__(in_features, heads, bias=True)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.bias, self.bias_init)


def init_memory_params(params: nn.ParameterDict, std: float = 0.02, init=nn.init) -> None:
    """W_0 of a deep memory. Depth 1: `W = 0` (the memory starts as linear attention does). MLP:
    `W1 ~ N(0, std)` (f_W starts close to the identity) and `W2 ~ N(0, 1/E)`, so that `a = gelu(W2 k)` has a
    small norm for unit keys: the inner gradient step on W1 has curvature `‖a‖²`, and `θ‖a‖² > 2` makes the
    online update diverge (with `W2 ~ N(0, 1)` Titans overflows within a few tokens). `init` is
    `torch.nn.init` or HF's `transformers.initialization` (which skips loaded weights)."""
    if "W1" in params:
        init.normal_(params["W1"], mean=0.0, std=std)
        init.normal_(params["W2"], mean=0.0, std=params["W2"].shape[1] ** -0.5)
    if "W" in params:
        init.zeros_(params["W"])


class MemoryCachingAttention(nn.Module):
    """Memory Caching token mixer.

    `x -> q, k, v (, u)` linear projections; a causal depthwise short convolution (kernel `conv_size`)
    with SiLU on q, k, v; ℓ2-normalised q and k per head; per-head gates `sigmoid(x W_g + b_g)` for the
    memory's gate names; :func:`mcrnn.ops.memory_caching`; a per-head RMSNorm of the output times
    `silu(x W_o_gate)`; the output projection.

    Shapes: `hidden_states: [B, T, D]` -> `[B, T, D]`; per head K = `head_dim`, V = `head_v_dim`.

    Padding (`attention_mask: [B, S]`, 1 = keep, S >= T; the last T columns are this call's tokens): a padded
    token writes nothing to the memory (zero k and v, gates set to their "no change" values, zero input to the
    short convolution), so with left padding the real tokens see exactly what they would see unpadded, except
    that segment positions still count the padding.

    `cache_scores="input"` (scored aggregations only, needs `use_u`): the summary of a segment is not its mean
    key but its mean absolute position over `segment_size` (`summary_keys: [B, T, H, 1]` of the op, positions
    counted from the start of the sequence, cached tokens included), and `u` is one scalar per head: a learned,
    input-dependent recency slope. The weights of the cached memories then ignore what the segments stored.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        head_v_dim: int | None = None,
        memory: str = "linear",
        aggregation: str = "grm",
        segment_size: int = 256,
        segmentation: str = "constant",
        init: str = "checkpoint",
        top_k: int | None = None,
        mini_batch: int | None = 16,
        expansion: int = 4,
        memory_depth: int = 2,
        use_u: bool = True,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        layer_idx: int | None = None,
        cache_scores: str = "context",
    ):
        super().__init__()
        self.mem = get_memory(memory)  # ValueError naming `memory` if unknown
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown `aggregation` {aggregation!r}: choose one of {list(AGGREGATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown `init` {init!r}: choose one of {list(INITS)}")
        check_cache_scores(cache_scores, aggregation, use_u)
        self.cache_scores = cache_scores
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.head_v_dim = head_v_dim or self.head_dim
        self.memory, self.aggregation, self.segment_size = memory, aggregation, segment_size
        self.segmentation, self.init, self.top_k = segmentation, init, top_k
        self.mini_batch = mini_batch if self.mem.deep else None
        self.use_u, self.layer_idx = use_u, layer_idx
        H, K, V = num_heads, self.head_dim, self.head_v_dim

        self.q_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.k_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.v_proj = nn.Linear(hidden_size, H * V, bias=False)
        # `u` exists only where it is read: a model trained with a parameter-free aggregation ("none",
        # "residual", "mean") has the same parameters under any other parameter-free one (post-training MC).
        # Input-only scores read a scalar summary (the position), so `u` is one scalar per head.
        self.score_dim = 1 if cache_scores == "input" else K
        self.u_proj = (nn.Linear(hidden_size, H * self.score_dim, bias=False)
                       if (use_u and aggregation in SCORED) else None)
        self.conv = ShortConvolution(H * (2 * K + V), conv_size)
        self.gate_names = tuple(self.mem.gate_names)
        self.gates = nn.ModuleDict(
            {n: GateLinear(hidden_size, H, GATE_BIAS.get(n, 0.0)) for n in self.gate_names}
        )
        self.memory_params = nn.ParameterDict()
        if self.mem.deep:
            if memory_depth == 1:
                self.memory_params["W"] = nn.Parameter(torch.zeros(H, V, K))
            elif memory_depth == 2:
                if K != V:
                    raise ValueError(
                        f"memory {memory!r} with memory_depth=2 needs head_v_dim == head_dim, got {V} != {K}"
                    )
                E = expansion * K
                self.memory_params["W1"] = nn.Parameter(torch.zeros(H, V, E))
                self.memory_params["W2"] = nn.Parameter(torch.zeros(H, E, K))
            else:
                raise ValueError(f"`memory_depth` must be 1 or 2, got {memory_depth!r}")
        self.o_norm = RMSNorm(V, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, std: float = 0.02) -> None:
        """The deep memory's W_0 (:func:`init_memory_params`)."""
        init_memory_params(self.memory_params, std)

    def op_kwargs(self) -> dict:
        return dict(
            memory=self.memory, segment_size=self.segment_size, segmentation=self.segmentation,
            init=self.init,
            aggregation=self.aggregation, top_k=self.top_k, mini_batch=self.mini_batch,
            params=dict(self.memory_params) if self.mem.deep else None,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MCCache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, MCCache | None]:
        """`hidden_states: [B, T, D]`; `attention_mask: [B, S]` (S >= T) padding mask or None;
        `past_key_values`: an :class:`MCCache` (needs `layer_idx`); with `use_cache` this layer's state
        in it is read and replaced. Returns `(o: [B, T, D], None, past_key_values)`."""
        B, T, _ = hidden_states.shape
        H, K, V = self.num_heads, self.head_dim, self.head_v_dim
        state = None
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ValueError("`layer_idx` is required when a cache (`past_key_values`) is passed")
            state = past_key_values[self.layer_idx]
        mask = check_padding_mask(attention_mask, B, T)
        keep = mask[:, -T:] if mask is not None else None  # [B, T]

        x = hidden_states
        # a padded token feeds zeros to the convolution: the next real tokens see what they would see unpadded
        x_in = x * keep[..., None].to(x.dtype) if keep is not None else x
        qkv = torch.cat([self.q_proj(x_in), self.k_proj(x_in), self.v_proj(x_in)], dim=-1)
        qkv, conv_state = self.conv(qkv, state.conv if state is not None else None)
        q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
        q = F.normalize(q.view(B, T, H, K), dim=-1)
        k = F.normalize(k.view(B, T, H, K), dim=-1)
        v = v.reshape(B, T, H, V)
        u = self.u_proj(x).view(B, T, H, self.score_dim) if self.u_proj is not None else None
        summary_keys = None
        if self.cache_scores == "input":
            # absolute positions (the cached tokens and padding included, as the segmentation counts them), so
            # that decoding from a cache sees the summaries of the parallel forward; float32 at least, since a
            # bfloat16 position would be exact only up to 256
            t0 = state.seq_len if state is not None else 0
            dt = torch.promote_types(x.dtype, torch.float32)
            pos = torch.arange(t0, t0 + T, device=x.device, dtype=dt) / self.segment_size
            summary_keys = pos.view(1, T, 1, 1).expand(B, T, H, 1)
        # gates in float32: a bfloat16 sigmoid cannot resolve decays close to 1
        gates = {n: torch.sigmoid(lin(x).float()) for n, lin in self.gates.items()}
        if keep is not None:
            m = keep[:, :, None, None]
            k, v = k * m.to(k.dtype), v * m.to(v.dtype)
            kg = keep[..., None]  # [B, T, 1]
            gates = {n: torch.where(kg, g, torch.full_like(g, GATE_ON_PAD[n])) for n, g in gates.items()}

        want_state = state is not None and use_cache
        o, mc_state = memory_caching(
            q, k, v, u, gates=gates, initial_state=state.mc if state is not None else None,
            output_final_state=want_state, summary_keys=summary_keys, **self.op_kwargs(),
        )
        if want_state:
            state.mc, state.conv = mc_state, conv_state
            state.seq_len += T
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), None, past_key_values

    def extra_repr(self) -> str:
        scores = f"cache_scores={self.cache_scores!r}, " if self.cache_scores != "context" else ""
        return (f"memory={self.memory!r}, aggregation={self.aggregation!r}, "
                f"segment_size={self.segment_size}, segmentation={self.segmentation!r}, init={self.init!r}, "
                f"{scores}heads={self.num_heads}, "
                f"K={self.head_dim}, V={self.head_v_dim}")


def check_cache_scores(cache_scores: str, aggregation: str, use_u: bool) -> None:
    """ValueError naming `cache_scores` unless it is one of CACHE_SCORES and fits the aggregation and `use_u`."""
    if cache_scores not in CACHE_SCORES:
        raise ValueError(f"unknown `cache_scores` {cache_scores!r}: choose one of {list(CACHE_SCORES)}")
    if cache_scores == "input":
        if aggregation not in SCORED:
            raise ValueError(
                f"`cache_scores='input'` needs a scored aggregation {list(SCORED)}, got aggregation={aggregation!r} "
                "(its caches have no scores): use cache_scores='context'"
            )
        if not use_u:
            raise ValueError(
                "`cache_scores='input'` needs `use_u=True`: its score query is one scalar per head, `u = q` cannot be"
            )
