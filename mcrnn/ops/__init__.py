"""mcrnn ops: recurrent memories and Memory Caching over them (torch only; nothing heavy at import)."""

from mcrnn.ops.delta import chunk_delta, naive_delta
from mcrnn.ops.gdn import chunk_gdn, naive_gdn
from mcrnn.ops.linear import chunk_linear, naive_linear
from mcrnn.ops.mc import (
    AGGREGATIONS,
    INITS,
    SEGMENTATIONS,
    MCOptions,
    MCState,
    memory_caching,
    memory_caching_step,
    naive_memory_caching,
)
from mcrnn.ops.memories import MEMORIES, Memory, get_memory, register_memory
from mcrnn.ops.swla import chunk_swla, naive_swla

try:  # the deep memories register themselves with MEMORIES on import
    from mcrnn.ops import deep as _deep  # noqa: F401
except ImportError:  # pragma: no cover - only while the deep memories are not in the tree
    pass

__all__ = [
    "chunk_linear", "naive_linear", "chunk_swla", "naive_swla", "memory_caching", "naive_memory_caching",
    "memory_caching_step", "MCState", "MCOptions", "Memory", "MEMORIES", "get_memory", "register_memory",
    "AGGREGATIONS", "INITS", "SEGMENTATIONS",
    "chunk_delta", "naive_delta", "chunk_gdn", "naive_gdn",
]
