"""The memory MLP of the deep memories: `f_W(x) = x + W1 gelu(W2 x)` (`W1: [V, E]`, `W2: [E, K]`, `K == V`) or,
depth 1, `f_W(x) = W x` (`W: [V, K]`), its read and the explicit gradient of one token's loss.

Weights are dicts `{"W1", "W2"}` or `{"W"}` with any leading dims `[*L]` (usually `[B, H]`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return F.gelu(x)


def gelu_vjp(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad ⊙ gelu'(x)` in one fused op; autograd differentiates it (gelu_backward has a double backward)."""
    return torch.ops.aten.gelu_backward(grad, x)


def weight_keys(d: dict) -> tuple[str, ...]:
    """`("W",)` for a depth-1 memory, `("W1", "W2")` for the MLP."""
    return ("W",) if "W" in d else ("W1", "W2")


def mlp_read(W: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`f_W(x)` for weights with leading dims `[*L]` and `x: [*L, K]` -> `[*L, V]` (broadcasting allowed)."""
    if "W" in W:
        return (W["W"] @ x.unsqueeze(-1)).squeeze(-1)
    h = (W["W2"] @ x.unsqueeze(-1)).squeeze(-1)
    return x + (W["W1"] @ gelu(h).unsqueeze(-1)).squeeze(-1)


def token_gradient(
    W: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
    error: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor], needs_forward: bool = True,
) -> dict[str, torch.Tensor]:
    """`∇_W ℓ(W; k, v)` of one token, written out by the chain rule: `k: [*L, K]`, `v: [*L, V]`, weights `[*L, ...]`.

    `error(f, v)` is `e = dℓ/df` at `f = f_W(k)` (`f` is None when not `needs_forward`: the error does not
    depend on it). Then `∇W = e kᵀ` (depth 1), or `∇W1 = e aᵀ` and `∇W2 = ((W1ᵀ e) ⊙ gelu'(h)) kᵀ` with
    `h = W2 k`, `a = gelu(h)`: full `[*L, ...]` matrices, like the weights."""
    col, row = k.unsqueeze(-1), k.unsqueeze(-2)  # k as a column and as a row
    if "W" in W:
        e = error((W["W"] @ col).squeeze(-1) if needs_forward else None, v)
        return {"W": e.unsqueeze(-1) @ row}
    h = (W["W2"] @ col).squeeze(-1)
    a = gelu(h)
    e = error(k + (W["W1"] @ a.unsqueeze(-1)).squeeze(-1) if needs_forward else None, v)
    dh = gelu_vjp((e.unsqueeze(-2) @ W["W1"]).squeeze(-2), h)  # (W1ᵀ e) ⊙ gelu'(h)
    return {"W1": e.unsqueeze(-1) @ a.unsqueeze(-2), "W2": dh.unsqueeze(-1) @ row}
