"""The `linear` memory for Memory Caching: `S_t = a_t S_{t-1} + k_t v_tᵀ`, read `q_tᵀ S_t`."""

from __future__ import annotations

import torch

from mcrnn.ops.linear.chunk import _log_decay, linear_scan
from mcrnn.ops.memory import Gate, Memory
from mcrnn.ops.utils import selected_matmul, span_weighted_matmul, weighted_matmul


class LinearMemory(Memory):
    """Linear attention with a scalar decay per token and head (gate `decay`, default 1)."""

    name = "linear"
    gates = {"decay": Gate(init_bias=3.0, on_pad=1.0, default=1.0)}
    readable_keys = ("S",)

    def state_numel(self, K, V, *, memory_depth=2, expansion=4):
        return {"state": K * V, "cache": K * V}

    def init_state(self, B, H, K, V, like, params):
        return {"S": like.new_zeros(B, H, K, V)}

    def step(self, state, k, v, gates, *, seg_pos, params, mini_batch):
        a = gates["decay"][..., None, None] if "decay" in gates else 1.0
        return {"S": a * state["S"] + k.unsqueeze(-1) * v.unsqueeze(-2)}

    def read(self, state, q, scale):
        return torch.einsum("...k,...kv->...v", q * scale, state["S"])

    def read_cached(self, cache, q, scale):
        return ((q * scale).unsqueeze(2).unsqueeze(3) @ cache["S"]).squeeze(3)

    def read_dense(self, cache, q, scale):
        S = cache["S"]  # [B, H, N, K, V]
        B, H, N, K, V = S.shape
        flat = S.permute(0, 1, 3, 2, 4).reshape(B, H, K, N * V)
        return ((q * scale) @ flat).view(B, H, q.shape[2], N, V)

    def read_weighted(self, cache, weights, q, scale):
        # Σ_n w_n qᵀ S_n = [w_1 q, ..., w_N q] · [S_1; ...; S_N]: one GEMM, no [t, N, V] intermediate
        S = cache["S"]
        B, H, N, K, V = S.shape
        return weighted_matmul(weights, q * scale, S.reshape(B, H, N * K, V))

    selected_reads = True
    span_reads = True

    def read_weighted_spans(self, cache, weights, q, spans, scale):
        return span_weighted_matmul(weights, q * scale, cache["S"], spans)

    def read_selected(self, cache, q, pick, weights, valid, scale):
        return selected_matmul(weights, q * scale, cache["S"], pick, valid)

    def read_groups(self, states, q, scale):
        return (q * scale) @ states["S"]

    def scan(self, q, k, v, gates, *, initial, segment_starts, resets, positions, offset, scale, params, mini_batch,
             backend="torch", operand_dtype=None):
        log_a = _log_decay(gates["decay"]) if "decay" in gates else None
        o, snaps, final = linear_scan(
            q * scale if q is not None else None, k, v, log_a,
            resets=resets, initial_state=initial["S"], positions=positions, backend=backend,
            operand_dtype=operand_dtype,
        )
        return o, ({"S": snaps} if snaps is not None else None), {"S": final}
