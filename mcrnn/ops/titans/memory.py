"""The `titans` memory (SPEC §1): momentum `S_t = η_t S_{t-1} − θ_t ∇ℓ_t(W_mb)`, `W_t = (1 − α_t) W_{t-1} + S_t`,
`ℓ = ½‖f_W(k) − v‖²`."""

from __future__ import annotations

import torch

from mcrnn.ops.deep.memory import DeepMemory
from mcrnn.ops.deep.scan import segprod
from mcrnn.ops.memory import Gate

#: momentum key of each weight
MOMENTUM = {"W": "S", "W1": "S1", "W2": "S2"}


class TitansMemory(DeepMemory):
    """Titans: momentum `S_t = η_t S_{t-1} - θ_t ∇½‖f_W(k_t) - v_t‖²`, `W_t = (1 - α_t) W_{t-1} + S_t` (gates
    `lr` = θ, `momentum` = η, `forget` = α). The momentum starts at zero."""

    name = "titans"
    # on padded tokens a momentum of 0 keeps a zero momentum at zero; mid-sequence padding resets it
    gates = {
        "lr": Gate(init_bias=0.0, on_pad=0.0, default=1.0),
        "momentum": Gate(init_bias=0.0, on_pad=0.0, default=0.0),
        "forget": Gate(init_bias=-3.0, on_pad=0.0, default=0.0),
    }

    def error(self, f, v):
        return f - v

    def error_vjp(self, de):
        return de, -de

    def update(self, state, grads, gates):
        eta, theta = gates["momentum"][..., None, None], gates["lr"][..., None, None]
        keep = (1.0 - gates["forget"])[..., None, None]
        new = {}
        for n, g in grads.items():
            m = MOMENTUM[n]
            new[m] = torch.addcmul(eta * state[m], theta, g, value=-1.0)
            new[n] = torch.addcmul(new[m], keep, state[n])
        return new

    def blocks(self, weight):
        return (weight, MOMENTUM[weight])

    def with_extras(self, W):
        return {**W, **{MOMENTUM[n]: torch.zeros_like(x) for n, x in W.items()}}

    def transition(self, gates):
        """The stacked `[W; S]` map. With `β = 1 − α`, `P_ts = Π_{s<i<=t} β_i`, `Q_ts = Π_{s<i<=t} η_i` and the
        prefix products `cW_t = Π_{i<=t} β_i`, `cE_t = Π_{i<=t} η_i`:

            S_t = cE_t S_in − Σ_j (Q ⊙ θ)_tj ∇_j,    W_t = cW_t W_in + (P cE)_t S_in − Σ_j ((P Q) ⊙ θ)_tj ∇_j

        (`W_t = Σ_{s<=t} P_ts S_s + cW_t W_in`, and `S_s` gets `∇_j` with `Q_sj`)."""
        beta, eta, theta = 1.0 - gates["forget"], gates["momentum"], gates["lr"].unsqueeze(-2)
        P, Q = segprod(beta), segprod(eta)
        cE = eta.cumprod(-1)
        cW, cS = beta.cumprod(-1), (P @ cE.unsqueeze(-1)).squeeze(-1)
        A = torch.stack([torch.stack([cW, cS], -1), torch.stack([torch.zeros_like(cE), cE], -1)], -2)
        return A, torch.stack([(P @ Q) * theta, Q * theta], -2)
