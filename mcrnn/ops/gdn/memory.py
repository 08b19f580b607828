"""The `gdn` memory for Memory Caching: Gated DeltaNet, `S_t = a_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`."""

from __future__ import annotations

from mcrnn.ops.delta.memory import DeltaMemory
from mcrnn.ops.memory import Gate


class GDNMemory(DeltaMemory):
    """Gated DeltaNet: DeltaNet with a decay gate `decay` (default 1: then it is `delta`)."""

    name = "gdn"
    gates = {
        "beta": Gate(init_bias=0.0, on_pad=0.0, default=1.0, hi=2.0, layer_hi=1.0),
        "decay": Gate(init_bias=3.0, on_pad=1.0, default=1.0),
    }
