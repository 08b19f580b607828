"""Small modules shared by the token mixers: RMSNorm, the causal short convolution, RoPE, padding masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time followed by SiLU.

    The decode state is the last `kernel_size - 1` inputs, `[B, C, kernel_size - 1]`. The output at token
    t only sees inputs `t - kernel_size + 1 .. t`; tokens before the start of the sequence count as zeros,
    so a call with the state of a previous call continues that sequence exactly.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"`conv_size` must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.normal_(self.weight, std=kernel_size**-0.5)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x: [B, T, C]`, `state: [B, C, kernel_size - 1]` or None
        -> `(silu(conv(x)): [B, T, C], new state)`."""
        B, T, C = x.shape
        xt = x.transpose(1, 2)
        if state is None:
            state = xt.new_zeros(B, C, self.kernel_size - 1)
        full = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, C, kernel_size - 1 + T]
        if T == 1:  # decoding: one dot product per channel (a conv1d call costs ~100 µs on a CPU here)
            y = (full * self.weight.to(xt.dtype).squeeze(1)).sum(-1, keepdim=True)
        else:
            y = F.conv1d(full, self.weight.to(xt.dtype), groups=C)
        new_state = full[..., full.shape[-1] - (self.kernel_size - 1):]
        return F.silu(y).transpose(1, 2), new_state

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (half-split layout, as in Llama). `x: [B, H, T, D]`, `positions: [B, T]` (int)
    -> `[B, H, T, D]`."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [B, 1, T, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def check_padding_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """Validate a 2-D padding mask (`[B, S]`, 1 = keep, `S >= T`: it may cover the cached tokens too) and
    return it as bool, or None when there is no mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        is_t = isinstance(attention_mask, torch.Tensor)
        got = tuple(attention_mask.shape) if is_t else type(attention_mask).__name__
        raise ValueError(f"`attention_mask` must be a 2-D padding mask [batch, seq_len] (1 = keep), "
                         f"got {got}")
    if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(
            f"`attention_mask` must have shape [{B}, S] with S >= {T} (the new tokens, optionally preceded "
            f"by the cached ones), got {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()
