"""The Memory Caching token mixer (SPEC §3) over any registered memory and aggregation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcrnn.layers.cache import MCCache
from mcrnn.layers.utils import RMSNorm, ShortConvolution, check_padding_mask
from mcrnn.ops import MCSpec, memory_caching, memory_caching_step
from mcrnn.ops.mc import make_options
from mcrnn.ops.mc.state import check_cu_seqlens


class GateLinear(nn.Linear):
    """`x -> [.., heads]` logits of one gate; `bias_init` is the bias it is (re)initialised to."""

    def __init__(self, in_features: int, heads: int, bias_init: float = 0.0):
        self.bias_init = bias_init
        super().__init__(in_features, heads, bias=True)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.bias, self.bias_init)


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

    Packed sequences (`cu_seqlens`, fla's keyword: `B == 1`, `[0, e_1, ..., T]`): every sequence is computed as
    if it ran alone: the short convolution starts each from zeros, the op runs each from M_0 with segments
    counted from its first token (input-only scores count positions from it too). No cache, no padding mask.
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
        backend: str | None = None,
        allow_neg_eigval: bool = False,
        fixed_gates: tuple[str, ...] = (),
        online_weight: float | None = None,
        spec: MCSpec | None = None,
    ):
        super().__init__()
        if spec is None:
            spec = MCSpec(memory=memory, aggregation=aggregation, segment_size=segment_size,
                          segmentation=segmentation, init=init, top_k=top_k, mini_batch=mini_batch,
                          cache_scores=cache_scores, use_u=use_u, memory_depth=memory_depth, expansion=expansion,
                          backend=backend, allow_neg_eigval=allow_neg_eigval, fixed_gates=tuple(fixed_gates),
                          online_weight=online_weight)
        elif not isinstance(spec, MCSpec):
            raise ValueError(f"`spec` must be an mcrnn.ops.MCSpec, got {type(spec).__name__}")
        self.spec = spec
        self.mem = spec.mem
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.head_v_dim = head_v_dim or self.head_dim
        self.layer_idx = layer_idx
        H, K, V = num_heads, self.head_dim, self.head_v_dim
        spec.check_dims(K, V)

        self.q_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.k_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.v_proj = nn.Linear(hidden_size, H * V, bias=False)
        # `u` exists only where it is read: a model trained with a parameter-free aggregation ("none",
        # "residual", "mean") has the same parameters under any other parameter-free one (post-training MC).
        # Input-only scores read a scalar summary (the position), so `u` is one scalar per head.
        self.score_dim = 1 if spec.cache_scores == "input" else K
        self.u_proj = (nn.Linear(hidden_size, H * self.score_dim, bias=False)
                       if (spec.use_u and spec.scored) else None)
        self.conv = ShortConvolution(H * (2 * K + V), conv_size)
        self.gate_names = self.mem.gate_names
        # a fixed gate has no projection: it is held at the value the op takes when the gate is not given
        self.gates = nn.ModuleDict(
            {n: GateLinear(hidden_size, H, g.init_bias) for n, g in self.mem.gates.items()
             if n not in spec.fixed_gates}
        )
        self.memory_params = nn.ParameterDict(
            {n: nn.Parameter(x) for n, x in self.mem.make_params(
                H, K, V, memory_depth=spec.memory_depth, expansion=spec.expansion).items()}
        )
        self.o_norm = RMSNorm(V, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)
        self.reset_memory_parameters()

    # the settings, read from the spec (one source of truth)
    memory = property(lambda self: self.spec.memory)
    aggregation = property(lambda self: self.spec.aggregation)
    segment_size = property(lambda self: self.spec.segment_size)
    segmentation = property(lambda self: self.spec.segmentation)
    init = property(lambda self: self.spec.init)
    top_k = property(lambda self: self.spec.top_k)
    mini_batch = property(lambda self: self.spec.mini_batch)
    cache_scores = property(lambda self: self.spec.cache_scores)
    use_u = property(lambda self: self.spec.use_u)

    def reset_memory_parameters(self, std: float = 0.02, init=nn.init) -> None:
        """The memory's learned parameters (e.g. a deep memory's W_0), as the memory initialises them; `init` is
        `torch.nn.init` or HF's `transformers.initialization` (which skips loaded weights)."""
        self.mem.init_params(self.memory_params, std, init=init)

    def op_kwargs(self) -> dict:
        return dict(spec=self.spec, params=dict(self.memory_params) if len(self.memory_params) else None)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MCCache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None, MCCache | None]:
        """`hidden_states: [B, T, D]`; `attention_mask: [B, S]` (S >= T) padding mask or None;
        `past_key_values`: an :class:`MCCache` (needs `layer_idx`); with `use_cache` this layer's state
        in it is read and replaced; `cu_seqlens`: packed sequences (see the class docstring).
        Returns `(o: [B, T, D], None, past_key_values)`."""
        B, T, _ = hidden_states.shape
        H, K, V = self.num_heads, self.head_dim, self.head_v_dim
        lengths = None
        if cu_seqlens is not None:
            lengths = self._packed_lengths(cu_seqlens, attention_mask, past_key_values, use_cache, B, T)
            attention_mask = None
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
        if lengths is None:
            qkv, conv_state = self.conv(qkv, state.conv if state is not None else None)
        else:  # each packed sequence's convolution starts from zeros: no token sees the previous sequence
            qkv = torch.cat([self.conv(piece)[0] for piece in qkv.split(lengths, dim=1)], dim=1)
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
            if lengths is None:
                pos = torch.arange(t0, t0 + T, device=x.device, dtype=dt) / self.segment_size
            else:  # packed: counted from each sequence's first token
                pos = torch.cat([torch.arange(n, device=x.device, dtype=dt) for n in lengths]) / self.segment_size
            summary_keys = pos.view(1, T, 1, 1).expand(B, T, H, 1)
        # gates in float32: a bfloat16 sigmoid cannot resolve decays close to 1
        spec_gates = self.mem.gates
        wide = self.spec.allow_neg_eigval
        gates = {n: _scaled_sigmoid(lin(x).float(), spec_gates[n].hi if wide else spec_gates[n].layer_hi)
                 for n, lin in self.gates.items()}
        for n in self.spec.fixed_gates:  # explicit, so that padding below can still set its "no change" value
            gates[n] = x.new_full((B, T, H), spec_gates[n].default, dtype=torch.float32)
        if keep is not None:
            m = keep[:, :, None, None]
            k, v = k * m.to(k.dtype), v * m.to(v.dtype)
            kg = keep[..., None]  # [B, T, 1]
            gates = {n: torch.where(kg, g, torch.full_like(g, spec_gates[n].on_pad)) for n, g in gates.items()}

        want_state = state is not None and use_cache
        if T == 1 and want_state and state.mc is not None:
            o, mc_state = self._decode_step(q, k, v, u, gates, summary_keys, state.mc)
        else:
            o, mc_state = memory_caching(
                q, k, v, u, gates=gates, initial_state=state.mc if state is not None else None,
                output_final_state=want_state, summary_keys=summary_keys, cu_seqlens=cu_seqlens, **self.op_kwargs(),
            )
        if want_state:
            state.mc, state.conv = mc_state, conv_state
            state.seq_len += T
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), None, past_key_values

    @staticmethod
    def _packed_lengths(cu_seqlens, attention_mask, past_key_values, use_cache, B: int, T: int) -> list[int]:
        """The lengths of packed sequences, checked against what a packed call cannot take."""
        ends = check_cu_seqlens(cu_seqlens, B, T)
        if past_key_values is not None or use_cache:
            raise ValueError("`cu_seqlens` cannot be combined with a cache (`past_key_values` / `use_cache`): "
                             "packed calls are for training and scoring; decode each sequence unpacked")
        if attention_mask is not None and not bool(check_padding_mask(attention_mask, B, T).all()):
            raise ValueError("`cu_seqlens` cannot be combined with padding (`attention_mask`): pack the real "
                             "tokens only")
        return [e - s for s, e in zip(ends, ends[1:])]

    def _decode_step(self, q, k, v, u, gates, summary_keys, mc_state):
        """One token from the cache: the op's decode step without the per-call checks (the layer built every
        input itself: gates from sigmoids, state from the previous call). `q, k, v, u: [B, 1, H, D]`."""
        dt = mc_state.key_sum.dtype
        Ks = mc_state.key_sum.shape[-1]
        key = (q.shape[-1], v.shape[-1], Ks, dt, q.device)
        params = {n: p.to(dt) for n, p in self.memory_params.items()} or None  # live: they may have been trained
        if getattr(self, "_decode_key", None) != key:  # the checked options depend on dims, dtype and device only
            self._decode_opts = make_options(spec=self.spec, scale=None, score_scale=None, params=params,
                                             boundaries=None, K=q.shape[-1], V=v.shape[-1], H=q.shape[2], Ks=Ks)
            self._decode_key = key
        self._decode_opts.params = params
        first = lambda x: x[:, 0].to(dt) if x is not None else None  # [B, 1, H, ...] -> [B, H, ...]
        o, new_state = memory_caching_step(
            mc_state, first(q), first(k), first(v), first(u), gates={n: first(g) for n, g in gates.items()},
            opts=self._decode_opts, summary_keys=first(summary_keys),
        )
        return o.unsqueeze(1).to(q.dtype), new_state

    def extra_repr(self) -> str:
        scores = f"cache_scores={self.cache_scores!r}, " if self.cache_scores != "context" else ""
        return (f"memory={self.memory!r}, aggregation={self.aggregation!r}, "
                f"segment_size={self.segment_size}, segmentation={self.segmentation!r}, init={self.init!r}, "
                f"{scores}heads={self.num_heads}, "
                f"K={self.head_dim}, V={self.head_v_dim}")


def _scaled_sigmoid(x: torch.Tensor, hi: float) -> torch.Tensor:
    """A gate in [0, hi] (hi = 2: the delta rule's β with negative eigenvalues)."""
    return torch.sigmoid(x) if hi == 1.0 else hi * torch.sigmoid(x)
