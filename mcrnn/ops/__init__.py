"""mcrnn ops: recurrent memories and Memory Caching over them (torch only; nothing heavy at import)."""

from mcrnn.ops.delta import chunk_delta, naive_delta
from mcrnn.ops.dla import chunk_dla, naive_dla
from mcrnn.ops.gdn import chunk_gdn, naive_gdn
from mcrnn.ops.linear import chunk_linear, naive_linear
from mcrnn.ops.mc import (
    AGGREGATIONS,
    CACHE_SCORES,
    INITS,
    SEGMENTATIONS,
    Aggregation,
    MCOptions,
    MCSpec,
    MCState,
    memory_caching,
    memory_caching_step,
    naive_memory_caching,
)
from mcrnn.ops.memory import Gate, Memory
from mcrnn.ops.registry import MEMORIES, get_memory, register_memory
from mcrnn.ops.swla import chunk_swla, naive_swla
from mcrnn.ops.titans import chunk_titans, naive_titans

__all__ = [
    "chunk_linear", "naive_linear", "chunk_swla", "naive_swla", "chunk_dla", "naive_dla", "chunk_titans",
    "naive_titans", "chunk_delta", "naive_delta", "chunk_gdn", "naive_gdn", "memory_caching", "naive_memory_caching",
    "memory_caching_step", "MCSpec", "MCState", "MCOptions", "Memory", "Gate", "MEMORIES", "get_memory",
    "register_memory", "Aggregation", "AGGREGATIONS", "INITS", "SEGMENTATIONS", "CACHE_SCORES",
]
