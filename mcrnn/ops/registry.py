"""The memories Memory Caching knows, by name: one explicit line per memory (no registration on import)."""

from __future__ import annotations

from mcrnn.ops.delta.memory import DeltaMemory
from mcrnn.ops.dla.memory import DLAMemory
from mcrnn.ops.gdn.memory import GDNMemory
from mcrnn.ops.linear.memory import LinearMemory
from mcrnn.ops.memory import Memory
from mcrnn.ops.swla.memory import SWLAMemory
from mcrnn.ops.titans.memory import TitansMemory

MEMORIES: dict[str, Memory] = {
    "linear": LinearMemory(),
    "swla": SWLAMemory(),
    "dla": DLAMemory(),
    "titans": TitansMemory(),
    "delta": DeltaMemory(),
    "gdn": GDNMemory(),
}


def register_memory(memory: Memory) -> Memory:
    """Make a user-defined memory available to `memory_caching(..., memory=name)`, the layers and the models."""
    if not isinstance(memory, Memory) or not memory.name:
        raise ValueError(f"`memory` must be a named mcrnn.ops.Memory instance, got {memory!r}")
    MEMORIES[memory.name] = memory
    return memory


def get_memory(name: str) -> Memory:
    if name not in MEMORIES:
        raise ValueError(f"unknown `memory` {name!r}: choose one of {sorted(MEMORIES)}")
    return MEMORIES[name]
