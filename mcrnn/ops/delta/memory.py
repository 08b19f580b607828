"""The `delta` memory for Memory Caching: DeltaNet, `S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ`."""

from __future__ import annotations

from mcrnn.ops.delta.chunk import delta_scan
from mcrnn.ops.linear.chunk import _log_decay
from mcrnn.ops.linear.memory import LinearMemory
from mcrnn.ops.memory import Gate


class DeltaMemory(LinearMemory):
    """DeltaNet (gate `beta`, default 1): the state `S: [K, V]` is read linearly (`q_tᵀ S_t`), so it inherits
    the linear memory's reads (and so every aggregation, `soup == grm`, and the Triton cached reads).

    `beta` lies in [0, 2]: a layer produces it in [0, 1] (`sigmoid`), or in [0, 2] with `allow_neg_eigval`
    (`I − β k kᵀ` then has eigenvalues in [−1, 1] for unit keys). On a padded token `beta = 0` leaves `S`."""

    name = "delta"
    gates = {"beta": Gate(init_bias=0.0, on_pad=0.0, default=1.0, hi=2.0, layer_hi=1.0)}

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        S = state["S"]
        if "decay" in gates:
            S = gates["decay"][..., None, None] * S
        beta = gates["beta"][..., None] if "beta" in gates else 1.0
        err = v - (k.unsqueeze(-2) @ S).squeeze(-2)  # v_t − (a_t S_{t-1})ᵀ k_t
        return {"S": S + k.unsqueeze(-1) * (beta * err).unsqueeze(-2)}

    def scan(self, q, k, v, gates, *, initial, segment_starts, resets, positions, offset, scale, params, mini_batch):
        beta = gates["beta"] if "beta" in gates else k.new_ones(k.shape[:3])
        log_a = _log_decay(gates["decay"]) if "decay" in gates else None
        o, snaps, final = delta_scan(
            q * scale if q is not None else None, k, v, beta, log_a,
            resets=resets, initial_state=initial["S"], positions=positions,
        )
        return o, ({"S": snaps} if snaps is not None else None), {"S": final}
