"""Triton kernels for Memory Caching's cached reads (imported lazily: `import mcrnn.ops` never imports triton).

- :func:`cached_read`: the fused read of the online memory and the visible caches for `grm` / linear `soup`,
  `residual` and `mean`, forward and backward, nothing of size `T × N × V` in memory;
- :func:`ssc_read`: the reads of only the selected caches (SSC), and :func:`ssc_cached_read`, the whole SSC
  aggregation around it (router in PyTorch);
- :func:`chunk_scan`: the base linear memory's scan (`linear_scan`'s contract: resets, segment-end snapshots,
  the final state), forward and backward; :func:`scan_unsupported_reason` says when it cannot take a call.

Inputs are heads-first (`[B, H, T, K]`, the pool `[B, H, P, K, V]`), float32/bf16/fp16, accumulation float32.
On CPU tensors the kernels run in Triton's interpreter: set `TRITON_INTERPRET=1` in the environment before
triton is first imported (see `_common`).
:func:`unsupported_reason` says why a call cannot take the kernels (a dispatcher then uses the torch path).
"""

from __future__ import annotations

import torch

from mcrnn.ops.triton._common import INTERPRET, MAX_HEAD_DIM, triton_import_mode
from mcrnn.ops.triton._common import unsupported_reason as _unsupported

with triton_import_mode():
    try:  # triton imports gluon lazily at the first launch, and gluon checks the environment against the mode
        import triton.experimental.gluon  # noqa: F401
    except ImportError:  # pragma: no cover - triton without gluon
        pass
    from mcrnn.ops.triton.cached import AGGREGATION_CODES, cached_read
    from mcrnn.ops.triton.scan import chunk_scan, scan_unsupported_reason
    from mcrnn.ops.triton.ssc import ssc_cached_read, ssc_read

#: the aggregations the kernels cover for memories whose read is linear in the state (`Memory.linear_read`)
AGGREGATIONS = (*AGGREGATION_CODES, "ssc")


def unsupported_reason(q: torch.Tensor, pool_S: torch.Tensor, aggregation: str, u: torch.Tensor | None = None
                       ) -> str | None:
    """None when the kernels take this call, else why not (then use the torch path). `q: [B, H, T, K]`,
    `pool_S: [B, H, P, K, V]`, `u: [B, H, T, Ks]`."""
    if aggregation not in AGGREGATIONS:
        return f"aggregation {aggregation!r} (the kernels cover {list(AGGREGATIONS)})"
    dims = (q.shape[-1], pool_S.shape[-1]) + ((u.shape[-1],) if u is not None else ())
    return _unsupported(q, pool_S, u, dims=dims)


__all__ = ["cached_read", "ssc_read", "ssc_cached_read", "unsupported_reason", "chunk_scan", "scan_unsupported_reason",
           "AGGREGATIONS", "INTERPRET", "MAX_HEAD_DIM"]
