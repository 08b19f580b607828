"""Memory Caching inside transformers' Mamba-2 mixer (`Mamba2ForCausalLM`, `Mamba2Model`).

Mamba-2's SSD recurrence is the `linear` memory with a decay (SPEC §1): per head,
`h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ`, `y_t = h_t C_t + D x_t`, so `k = B`, `v = Δ·x`, `q = C`,
`decay = exp(Δ·A)`, `scale = 1`, B and C shared by the heads of a group, plus the skip `D·x`. The adapted mixer
computes every step outside the recurrence exactly as transformers' torch path does (in_proj, the causal
conv1d and its cache, Δ = softplus(dt + dt_bias) clamped to `time_step_limit`, the padding mask, the gated
RMSNorm, out_proj) and sends the recurrence through :func:`mcrnn.ops.memory_caching`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mamba2 import modeling_mamba2
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2ForCausalLM,
    Mamba2Mixer,
    Mamba2Model,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    causal_conv1d_update,
)

from mcrnn.ops import memory_caching
from mcrnn.pretrained.cache import mc_cache_layer
from mcrnn.pretrained.settings import SCORED, MCSettings

MODEL_CLASSES = (Mamba2ForCausalLM, Mamba2Model)


class MemoryCachingMamba2Mixer(Mamba2Mixer):
    """A `Mamba2Mixer` whose recurrence runs through Memory Caching (its own parameters, plus `u_proj`).

    Made from a loaded mixer by :func:`adapt_mixer` (the class of the module changes; its parameters stay).
    Attributes: `mc`: the :class:`MCSettings`; `u_proj` (if `mc.has_u_proj`): `Linear(hidden_size,
    num_heads * ssm_state_size, bias=False)`, the score queries `u: [B, T, H, d_state]`.
    """

    mc: MCSettings

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """`hidden_states: [B, T, hidden_size]` -> `[B, T, hidden_size]`; `cache`: the model's transformers
        `Cache` (its layer `layer_idx` holds the conv state and the MC state); `attention_mask: [B, T]` padding
        mask (1 = keep) or None."""
        if cache is None:
            cache = kwargs.get("cache_params")
        dtype = hidden_states.dtype
        layer = mc_cache_layer(cache, self.layer_idx) if cache is not None else None

        # 1. input projection (as transformers)
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected_states = self.in_proj(hidden_states)
        A = -torch.exp(self.A_log.float())
        gate, hidden_states_B_C, dt = projected_states.split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )

        # 2. causal conv1d and its cache (as transformers)
        hidden_states_B_C = self._conv(hidden_states_B_C.transpose(1, 2), cache)
        hidden_states_B_C = apply_mask_to_padding_states(hidden_states_B_C.transpose(1, 2), attention_mask)
        x, B, C = torch.split(
            hidden_states_B_C,
            [self.intermediate_size, self.n_groups * self.ssm_state_size, self.n_groups * self.ssm_state_size],
            dim=-1,
        )

        # 3. the recurrence, through Memory Caching
        u = self.u_proj(hidden_states) if self.mc.has_u_proj else None
        scan_output = self._recurrence(x, dt, A, B, C, u, layer)

        # 4. gated RMSNorm and output projection (as transformers)
        scan_output = self.norm(scan_output, gate)
        return self.out_proj(scan_output.to(dtype))

    def _conv(self, x: torch.Tensor, cache) -> torch.Tensor:
        """transformers' causal conv1d and activation; reads and updates the conv state in `cache`. `x: [b, C, T]`."""
        conv_forward = getattr(modeling_mamba2, "causal_conv1d_forward", None)
        if conv_forward is not None:  # transformers >= 5.25 has it as a function (it also counts the tokens)
            return conv_forward(self.conv1d, x, cache, self.layer_idx, activation=self.activation)
        # transformers 5.24: the same steps, inline in Mamba2Mixer.forward there
        seq_len = x.shape[-1]
        weight = self.conv1d.weight.squeeze(1)
        conv_state = cache.get_conv_state(self.layer_idx, state_idx=0) if cache is not None else None
        if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
            return causal_conv1d_update(x, conv_state, weight, self.conv1d.bias, activation=self.activation)
        if cache is not None:
            x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        x = causal_conv1d_fn(x, weight, self.conv1d.bias, activation=self.activation)
        return x[:, :, -seq_len:] if cache is not None else x

    def _recurrence(self, x, dt, A, B, C, u, layer) -> torch.Tensor:
        """`x: [b, T, H*P]`, `dt: [b, T, H]` (before bias), `A: [H]`, `B, C: [b, T, G*N]`, `u: [b, T, H*N]` or
        None -> `y: [b, T, H*P]` in float32 (float64 for float64 models), the D skip included."""
        b, T, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        # transformers' chunked scan: dt + dt_bias, softplus, clamp to time_step_limit in dt's dtype, then the
        # scan in float32. (Its one-token path skips the clamp; here decoding uses the same Δ as the forward.)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
        dt = torch.clamp(dt, min=self.time_step_limit[0], max=self.time_step_limit[1])
        cd = torch.promote_types(x.dtype, torch.float32)
        dt = dt.to(cd)
        x = x.reshape(b, T, H, P).to(cd)
        k = B.reshape(b, T, G, N).to(cd).repeat_interleave(H // G, dim=2, output_size=H)
        q = C.reshape(b, T, G, N).to(cd).repeat_interleave(H // G, dim=2, output_size=H)
        v = x * dt[..., None]
        decay = torch.exp(dt * A.to(cd))  # [b, T, H], in (0, 1]
        if u is not None:
            u = u.reshape(b, T, H, N).to(cd)
        o, state = memory_caching(
            q, k, v, u, memory="linear", gates={"decay": decay}, scale=1.0, **self.mc.op_kwargs(),
            initial_state=layer.mc_state if layer is not None else None, output_final_state=layer is not None,
        )
        if layer is not None:
            layer.mc_state = state
        y = o + x * self.D.to(cd)[:, None]
        return y.reshape(b, T, H * P)

    def extra_repr(self) -> str:
        m = self.mc
        top_k = f", top_k={m.top_k}" if m.top_k is not None else ""
        u = f", use_u={m.use_u}" if m.aggregation in SCORED else ""
        return (f"memory_caching: aggregation={m.aggregation!r}, segment_size={m.segment_size}, "
                f"segmentation={m.segmentation!r}, init={m.init!r}{top_k}{u}")


def mixers(model: nn.Module) -> list[Mamba2Mixer]:
    """The Mamba-2 mixers of a `Mamba2ForCausalLM` / `Mamba2Model`, in layer order."""
    backbone = model.backbone if isinstance(model, Mamba2ForCausalLM) else model
    return [block.mixer for block in backbone.layers]


def adapt_mixer(mixer: Mamba2Mixer, settings: MCSettings) -> MemoryCachingMamba2Mixer:
    """Turn a loaded `Mamba2Mixer` into a :class:`MemoryCachingMamba2Mixer` in place (its parameters stay)."""
    if type(mixer) is not Mamba2Mixer:
        raise ValueError(f"expected a transformers Mamba2Mixer, got {type(mixer).__name__}")
    if mixer.num_heads % mixer.n_groups:
        raise ValueError(f"num_heads ({mixer.num_heads}) must be a multiple of n_groups ({mixer.n_groups})")
    mixer.__class__ = MemoryCachingMamba2Mixer
    mixer.mc = settings
    if settings.has_u_proj:
        w = mixer.in_proj.weight
        mixer.u_proj = nn.Linear(mixer.hidden_size, mixer.num_heads * mixer.ssm_state_size, bias=False,
                                 device=w.device, dtype=w.dtype)
        init_u_proj(mixer.u_proj, settings.u_init_std)
    return mixer


@torch.no_grad()
def init_u_proj(u_proj: nn.Linear, u_init_std: float) -> None:
    """`u_proj ~ N(0, u_init_std² / hidden_size)`: for inputs of unit RMS, `u` has entries of size `u_init_std`,
    the scores `<u, p_i> / sqrt(d_state)` are near 0 and the softmax over the memories starts near uniform
    (0 gives exactly the `mean` aggregation for grm/soup)."""
    if u_proj.weight.device.type == "meta":
        return  # loading: the checkpoint's weights replace it
    if u_init_std == 0:
        u_proj.weight.zero_()
    else:
        u_proj.weight.normal_(0.0, u_init_std * u_proj.in_features ** -0.5)
    u_proj.weight._is_hf_initialized = True  # transformers' init pass must not redraw it
