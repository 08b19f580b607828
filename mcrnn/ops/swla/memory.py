"""The `swla` memory for Memory Caching: sliding-window linear attention, window 2."""

from __future__ import annotations

from mcrnn.ops.linear.memory import LinearMemory
from mcrnn.ops.memory import Gate
from mcrnn.ops.swla.chunk import swla_scan


class SWLAMemory(LinearMemory):
    """`S_t = a_t S_{t-1} + b_t k_{t-1} v_{t-1}ᵀ + c_t k_t v_tᵀ` (gates `decay`, `prev`, `cur`, default 1).

    The state carries the previous token's `(k, v)`; `M_0` has them at zero, so restarting from `M_0` drops
    the `b_t k_{t-1} v_{t-1}ᵀ` term at a segment start (SPEC §1 decision). On a padded token `prev = cur = 0`
    and `decay = 1` keep `S`; the padded token's zero `(k, v)` becomes the previous token."""

    name = "swla"
    gates = {
        "decay": Gate(init_bias=3.0, on_pad=1.0, default=1.0),
        "prev": Gate(init_bias=3.0, on_pad=0.0, default=1.0),
        "cur": Gate(init_bias=3.0, on_pad=0.0, default=1.0),
    }

    def state_numel(self, K, V, *, memory_depth=2, expansion=4):
        return {"state": K * V + K + V, "cache": K * V}

    def init_state(self, B, H, K, V, like, params):
        return {"S": like.new_zeros(B, H, K, V), "k": like.new_zeros(B, H, K), "v": like.new_zeros(B, H, V)}

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        def g(name):
            return gates[name][..., None, None] if name in gates else 1.0

        S = (
            g("decay") * state["S"]
            + g("prev") * state["k"].unsqueeze(-1) * state["v"].unsqueeze(-2)
            + g("cur") * k.unsqueeze(-1) * v.unsqueeze(-2)
        )
        return {"S": S, "k": k, "v": v}

    def scan(self, q, k, v, gates, *, initial, segment_starts, resets, positions, offset, scale, params, mini_batch,
             backend="torch", operand_dtype=None):
        o, snaps, final = swla_scan(
            q * scale if q is not None else None, k, v,
            gates.get("decay"), gates.get("prev"), gates.get("cur"),
            initial_state=initial, resets=resets, positions=positions, backend=backend,
            operand_dtype=operand_dtype,
        )
        return o, (self.readable(snaps) if snaps is not None else None), final
