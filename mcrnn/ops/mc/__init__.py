"""Memory Caching (SPEC §2): one chunk-parallel entry point, its token-loop reference and the decode step."""

from mcrnn.ops.mc.chunk import memory_caching
from mcrnn.ops.mc.naive import memory_caching_step, naive_memory_caching
from mcrnn.ops.mc.state import AGGREGATIONS, INITS, SEGMENTATIONS, MCOptions, MCState, make_options

__all__ = [
    "memory_caching", "naive_memory_caching", "memory_caching_step", "MCState", "MCOptions", "make_options",
    "AGGREGATIONS", "INITS", "SEGMENTATIONS",
]
