"""What the deep memories (`dla`, `titans`) share: the memory MLP and its per-token gradient (`mlp`), the
chunk-parallel mini-batch scan (`scan`), the public op wrapper (`op`) and the :class:`DeepMemory` base class
with Memory Soup over it (`memory`). Each memory's own math lives in its folder (`mcrnn/ops/dla/`,
`mcrnn/ops/titans/`)."""

from mcrnn.ops.deep.memory import DeepMemory, SoupMix

__all__ = ["DeepMemory", "SoupMix"]
