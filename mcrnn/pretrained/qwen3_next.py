"""Memory Caching inside transformers' Qwen3-Next Gated DeltaNet mixer (`Qwen3NextForCausalLM`, `Qwen3NextModel`).

Qwen3-Next's linear-attention layers are Gated DeltaNet, the `gdn` memory (SPEC §1): per value head,
`S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`, `o_t = S_tᵀ q_t / sqrt(K)`, with q and k
l2-normalised and shared by the `num_v_heads / num_k_heads` value heads of a key head. The adapted mixer
computes every step outside the recurrence exactly as transformers' torch path does (in_proj_qkvz / in_proj_ba and
their head ordering, the causal conv1d and its cache, l2norm of q and k, β = sigmoid(b),
g = −exp(A_log) · softplus(a + dt_bias), the gated RMSNorm, out_proj) and sends the recurrence through
:func:`mcrnn.ops.memory_caching` with `decay = exp(g)`. The attention layers and the MoE / MLP blocks are
transformers' own, untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextForCausalLM,
    Qwen3NextGatedDeltaNet,
    Qwen3NextModel,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    causal_conv1d_update,
    l2norm,
)

from mcrnn.ops import memory_caching
from mcrnn.pretrained.cache import mc_cache_layer
from mcrnn.pretrained.mamba2 import init_u_proj
from mcrnn.pretrained.settings import SCORED, MCSettings

MODEL_CLASSES = (Qwen3NextForCausalLM, Qwen3NextModel)


class MemoryCachingQwen3NextGatedDeltaNet(Qwen3NextGatedDeltaNet):
    """A `Qwen3NextGatedDeltaNet` whose recurrence runs through Memory Caching (its own parameters, plus `u_proj`).

    Made from a loaded mixer by :func:`adapt_mixer` (the class of the module changes; its parameters stay).
    Attributes: `mc`: the :class:`MCSettings`; `u_proj` (if `mc.has_u_proj`): `Linear(hidden_size,
    num_v_heads * head_k_dim, bias=False)`, the score queries `u: [B, T, num_v_heads, head_k_dim]`.
    """

    mc: MCSettings

    # as transformers' forward: the conv weight is read directly, so its offloading hook must fire here
    @force_accelerate_hooks("conv1d")
    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """`hidden_states: [B, T, hidden_size]` -> `[B, T, hidden_size]`; `cache`: the model's transformers
        `Cache` (its layer `layer_idx` holds the conv state and the MC state); `attention_mask: [B, T]` padding
        mask (1 = keep) or None."""
        if cache is None:
            cache = kwargs.get("cache_params")
        if kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError("packed sequences (`cu_seq_lens_q`) are not supported by the Memory Caching "
                             "Qwen3-Next mixer: pass a padded batch with an attention_mask")
        layer = mc_cache_layer(cache, self.layer_idx) if cache is not None else None

        # 1. input projections and head ordering (as transformers)
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        seq_len = hidden_states.shape[1]
        query, key, value, z, b, a = self.fix_query_key_value_ordering(
            self.in_proj_qkvz(hidden_states), self.in_proj_ba(hidden_states)
        )
        query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
        mixed_qkv = torch.cat((query, key, value), dim=-1).transpose(1, 2)

        # 2. causal conv1d and its cache (as transformers)
        mixed_qkv = self._conv(mixed_qkv, cache, seq_len).transpose(1, 2)
        query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(query.shape[0], seq_len, -1, self.head_k_dim)
        key = key.reshape(key.shape[0], seq_len, -1, self.head_k_dim)
        value = value.reshape(value.shape[0], seq_len, -1, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

        # 3. the recurrence, through Memory Caching
        u = self.u_proj(hidden_states) if self.mc.has_u_proj else None
        core_attn_out = self._recurrence(query, key, value, g, beta, u, layer)

        # 4. gated RMSNorm and output projection (as transformers)
        z_shape = z.shape
        core_attn_out = self.norm(core_attn_out.reshape(-1, core_attn_out.shape[-1]), z.reshape(-1, z.shape[-1]))
        core_attn_out = core_attn_out.reshape(z_shape).reshape(z_shape[0], z_shape[1], -1)
        return self.out_proj(core_attn_out)

    def _conv(self, x: torch.Tensor, cache, seq_len: int) -> torch.Tensor:
        """transformers' causal conv1d and activation; reads and updates the conv state in `cache`. `x: [b, C, T]`."""
        weight = self.conv1d.weight.squeeze(1)
        conv_state = cache.get_conv_state(self.layer_idx, state_idx=0) if cache is not None else None
        if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
            return causal_conv1d_update(x, conv_state, weight, self.conv1d.bias, self.activation)
        if cache is not None:
            x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        x = causal_conv1d_fn(x, weight, self.conv1d.bias, activation=self.activation)
        return x[:, :, -seq_len:] if cache is not None else x

    def _recurrence(self, q, k, v, g, beta, u, layer) -> torch.Tensor:
        """`q, k: [b, T, Hk, K]`, `v: [b, T, Hv, V]`, `g, beta: [b, T, Hv]` (g = log decay), `u: [b, T, Hv*K]` or
        None -> `o: [b, T, Hv, V]` in v's dtype. The recurrence runs in float32 (float64 for float64 models)."""
        in_dtype = q.dtype
        b, T, Hk, K = k.shape
        Hv = v.shape[2]
        cd = torch.promote_types(in_dtype, torch.float32)
        if Hk != Hv:  # each q/k head serves Hv / Hk consecutive value heads (as transformers)
            q = q.repeat_interleave(Hv // Hk, dim=2)
            k = k.repeat_interleave(Hv // Hk, dim=2)
        q, k, v, g, beta = (x.to(cd) for x in (q, k, v, g, beta))
        q, k = l2norm(q, dim=-1, eps=1e-6), l2norm(k, dim=-1, eps=1e-6)
        if u is not None:
            u = u.reshape(b, T, Hv, K).to(cd)
        o, state = memory_caching(
            q, k, v, u, memory="gdn", gates={"beta": beta, "decay": torch.exp(g)}, scale=K ** -0.5,
            **self.mc.op_kwargs(),
            initial_state=layer.mc_state if layer is not None else None, output_final_state=layer is not None,
        )
        if layer is not None:
            layer.mc_state = state
        return o.to(in_dtype)

    def extra_repr(self) -> str:
        m = self.mc
        top_k = f", top_k={m.top_k}" if m.top_k is not None else ""
        u = f", use_u={m.use_u}" if m.aggregation in SCORED else ""
        return (f"memory_caching: aggregation={m.aggregation!r}, segment_size={m.segment_size}, "
                f"segmentation={m.segmentation!r}, init={m.init!r}{top_k}{u}")


def mixers(model: nn.Module) -> list[Qwen3NextGatedDeltaNet]:
    """The Gated DeltaNet mixers of a `Qwen3NextForCausalLM` / `Qwen3NextModel`, in layer order (the attention
    layers are not among them)."""
    backbone = model.model if isinstance(model, Qwen3NextForCausalLM) else model
    return [layer.linear_attn for layer in backbone.layers if getattr(layer, "linear_attn", None) is not None]


def adapt_mixer(mixer: Qwen3NextGatedDeltaNet, settings: MCSettings) -> MemoryCachingQwen3NextGatedDeltaNet:
    """Turn a loaded `Qwen3NextGatedDeltaNet` into a :class:`MemoryCachingQwen3NextGatedDeltaNet` in place."""
    if type(mixer) is not Qwen3NextGatedDeltaNet:
        raise ValueError(f"expected a transformers Qwen3NextGatedDeltaNet, got {type(mixer).__name__}")
    if mixer.num_v_heads % mixer.num_k_heads:
        raise ValueError(f"linear_num_value_heads ({mixer.num_v_heads}) must be a multiple of "
                         f"linear_num_key_heads ({mixer.num_k_heads})")
    mixer.__class__ = MemoryCachingQwen3NextGatedDeltaNet
    mixer.mc = settings
    if settings.has_u_proj:
        w = mixer.in_proj_qkvz.weight
        mixer.u_proj = nn.Linear(mixer.hidden_size, mixer.num_v_heads * mixer.head_k_dim, bias=False,
                                 device=w.device, dtype=w.dtype)
        init_u_proj(mixer.u_proj, settings.u_init_std)
    return mixer
