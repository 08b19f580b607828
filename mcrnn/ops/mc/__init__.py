"""Memory Caching (SPEC §2): the spec, the aggregations, the chunk-parallel entry point, its token-loop
reference and the decode step."""

from mcrnn.ops.mc.aggregations import AGGREGATIONS, Aggregation, get_aggregation
from mcrnn.ops.mc.chunk import memory_caching
from mcrnn.ops.mc.naive import naive_memory_caching
from mcrnn.ops.mc.spec import CACHE_SCORES, INITS, SEGMENTATIONS, MCSpec
from mcrnn.ops.mc.state import MCOptions, MCState, make_options, stack_states
from mcrnn.ops.mc.step import memory_caching_step

__all__ = [
    "memory_caching", "naive_memory_caching", "memory_caching_step", "MCSpec", "MCState", "MCOptions",
    "make_options", "stack_states", "Aggregation", "get_aggregation", "AGGREGATIONS", "INITS", "SEGMENTATIONS",
    "CACHE_SCORES",
]
