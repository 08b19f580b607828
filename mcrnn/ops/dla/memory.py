"""The `dla` memory (deep linear attention, SPEC §1): `W_t = a_t W_{t-1} − θ_t ∇ℓ_t(W_mb)`, `ℓ = −⟨f_W(k), v⟩`."""

from __future__ import annotations

import torch

from mcrnn.ops.deep.memory import DeepMemory
from mcrnn.ops.deep.scan import segprod
from mcrnn.ops.memory import Gate


class DLAMemory(DeepMemory):
    """Deep linear attention: `W_t = a_t W_{t-1} - θ_t ∇(-<f_W(k_t), v_t>)` (gates `lr` = θ, `decay` = a)."""

    name = "dla"
    gates = {"lr": Gate(init_bias=0.0, on_pad=0.0, default=1.0), "decay": Gate(init_bias=3.0, on_pad=1.0, default=1.0)}
    # `dℓ/df = −v` does not depend on `f`: at depth 1 the gradient needs no forward pass
    error_needs_forward = False

    def error(self, f, v):
        return -v

    def error_vjp(self, de):
        return None, -de

    def update(self, state, grads, gates):
        a, theta = gates["decay"][..., None, None], gates["lr"][..., None, None]
        return {n: torch.addcmul(a * state[n], theta, g, value=-1.0) for n, g in grads.items()}

    def transition(self, gates):
        """`W_t = (Π_{i<=t} a_i) W_in − Σ_{j<=t} θ_j (Π_{j<i<=t} a_i) ∇_j`: one block (`m = 1`)."""
        a, theta = gates["decay"], gates["lr"]
        R = segprod(a) * theta.unsqueeze(-2)  # R[t, j] = θ_j Π_{j<i<=t} a_i
        return a.cumprod(-1)[..., None, None], R.unsqueeze(-2)
