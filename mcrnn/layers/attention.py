"""Causal softmax attention with RoPE (the Transformer baseline), an optional short convolution, and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcrnn.layers.cache import MCCache
from mcrnn.layers.utils import ShortConvolution, check_padding_mask, rotary


class Attention(nn.Module):
    """Multi-head causal attention (SDPA) with rotary position embeddings.

    Shapes: `hidden_states: [B, T, D]` -> `[B, T, D]`; `num_heads` heads of `head_dim`.
    Positions (`position_ids: [B, T]`) default to the count of kept tokens before each token (padding
    excluded), continuing from the cache; padded keys (`attention_mask` 0) are never attended.
    `conv_size > 0` passes q, k, v through the causal depthwise short convolution (+ SiLU) the Memory Caching
    layers use, before RoPE, so that attention and the recurrent mixers see the same local mixing (one layer
    can then do associative recall: a key's projection already holds the token before it); 0 is the plain
    Transformer. Padded tokens feed zeros to the convolution, as in the Memory Caching layers.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int | None = None,
        layer_idx: int | None = None,
        conv_size: int = 0,
    ):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}")
        self.rope_theta, self.max_position_embeddings = rope_theta, max_position_embeddings
        self.layer_idx = layer_idx
        HD = num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, HD, bias=False)
        self.k_proj = nn.Linear(hidden_size, HD, bias=False)
        self.v_proj = nn.Linear(hidden_size, HD, bias=False)
        self.o_proj = nn.Linear(HD, hidden_size, bias=False)
        if not isinstance(conv_size, int) or isinstance(conv_size, bool) or conv_size < 0:
            raise ValueError(f"`conv_size` must be an integer >= 0 (0: no short convolution), got {conv_size!r}")
        self.conv = ShortConvolution(3 * HD, conv_size) if conv_size > 0 else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MCCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None, MCCache | None]:
        """`attention_mask: [B, S]` padding mask covering the new tokens and optionally the cached ones before
        them. Returns `(o: [B, T, D], None, past_key_values)`."""
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        state = None
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ValueError("`layer_idx` is required when a cache (`past_key_values`) is passed")
            state = past_key_values[self.layer_idx]
        past = state.keys.shape[2] if (state is not None and state.keys is not None) else 0
        S = past + T
        mask = check_padding_mask(attention_mask, B, T)
        if mask is not None and mask.shape[1] not in (T, S):
            raise ValueError(
                f"`attention_mask` must cover {T} or {S} tokens (cached + new), got {mask.shape[1]}"
            )
        if mask is not None and mask.shape[1] == T and past:
            mask = torch.cat([mask.new_ones(B, past), mask], dim=1)  # the cached tokens were kept
        if position_ids is None:
            if mask is not None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, S, device=hidden_states.device).expand(B, T)

        x = hidden_states
        if self.conv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            if mask is not None:  # a padded token feeds zeros to the convolution
                x = x * mask[:, -T:, None].to(x.dtype)
            qkv, conv_state = self.conv(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1),
                                        state.conv if state is not None else None)
            if state is not None and use_cache:
                state.conv = conv_state
            # the convolution's output is time-major in memory: SDPA's fused CPU kernel needs the head dim
            # contiguous, and without this copy it falls back to the 3x slower unfused path
            q, k, v = qkv.contiguous().split(H * D, dim=-1)
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        q, k = rotary(q, position_ids, self.rope_theta), rotary(k, position_ids, self.rope_theta)
        if state is not None and state.keys is not None:
            k = torch.cat([state.keys, k], dim=2)
            v = torch.cat([state.values, v], dim=2)
        if state is not None and use_cache:
            state.keys, state.values = k, v
            state.seq_len += T

        if mask is None and past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            qpos = torch.arange(past, S, device=q.device)[:, None]
            kpos = torch.arange(S, device=q.device)[None, :]
            allowed = kpos <= qpos  # [T, S]
            if mask is not None:
                # every query also sees itself, so a padded query has a finite (unused) output instead of NaN
                allowed = (allowed & mask[:, None, :]) | (kpos == qpos)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.view(-1, 1, T, S))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D)), None, past_key_values
