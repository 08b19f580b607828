"""The decode cache of the mcrnn models: one entry per layer, a `transformers` :class:`~transformers.Cache`.

A Memory Caching layer keeps its :class:`~mcrnn.ops.MCState` (online memory, cached memories, key sums) and
the state of its short convolution; an attention layer keeps its keys and values. Everything is tensors,
lists, dicts and dataclasses, with the batch as the first dim of every tensor, so a beam-search reorder is an
`index_select` on dim 0 of each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from mcrnn.ops import MCState


@dataclass
class LayerState:
    """The decode state of one layer.

    Attributes:
        mc: Memory Caching state (MC layers), batch first.
        conv: short-convolution state `[B, C, conv_size - 1]` (MC layers).
        keys, values: `[B, H, S, D]` (attention layers; keys are stored after RoPE).
        seq_len: tokens this layer has consumed (padding included).
    """

    mc: MCState | None = None
    conv: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    seq_len: int = 0

    # read by `transformers.Cache`'s aggregate properties
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    @property
    def is_initialized(self) -> bool:
        return self.seq_len > 0

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` to every tensor (all batch first), in place on this object."""
        if self.mc is not None:
            self.mc = self.mc.map(fn)
        for name in ("conv", "keys", "values"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, fn(x))

    def batch_size(self) -> int | None:
        if self.mc is not None:
            return self.mc.key_sum.shape[0]
        for x in (self.conv, self.keys):
            if x is not None:
                return x.shape[0]
        return None


class MCCache(Cache):
    """Per-layer decode states of an mcrnn model (MC layers and attention layers alike).

    `cache[layer_idx]` is that layer's :class:`LayerState` (created empty on first access). The layers read
    and write it themselves; `generate` uses :meth:`get_seq_length` (tokens consumed, padding included),
    :meth:`reorder_cache` (beam search), :meth:`batch_repeat_interleave` and :meth:`batch_select_indices`.
    The states cannot be cropped (a recurrent memory cannot forget its last tokens), so assisted generation is
    not supported.
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            num_layers = getattr(config, "num_hidden_layers", 0) if config is not None else 0
        super().__init__(layers=[LayerState() for _ in range(num_layers)])

    # ---- per-layer access -------------------------------------------------------------------------------
    def __getitem__(self, layer_idx: int) -> LayerState:
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"`layer_idx` must be an integer >= 0, got {layer_idx!r}")
        while len(self.layers) <= layer_idx:
            self.layers.append(LayerState())
        return self.layers[layer_idx]

    def __iter__(self):
        return iter(self.layers)

    # ---- what generate asks -----------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].seq_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # states do not grow with a limit

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.get_seq_length(0 if layer_idx is None else layer_idx) > 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("MCCache is written by the mcrnn layers themselves (see LayerState)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep batch rows `beam_idx` (in that order) in every layer's state."""
        for layer in self.layers:
            layer.apply(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.apply(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.apply(lambda x: x[indices.to(x.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self) -> None:
        self.layers = [LayerState() for _ in self.layers]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError("a recurrent memory cannot be cropped: MCCache does not support `crop`")

    def offload(self, layer_idx: int, only_non_sliding: bool = True):
        pass

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True):
        pass

    @property
    def batch_size(self) -> int:
        sizes = {b for b in (layer.batch_size() for layer in self.layers) if b is not None}
        if not sizes:
            return -1
        if len(sizes) > 1:
            raise ValueError(f"the batch size is not consistent across layers: {sorted(sizes)}")
        return sizes.pop()

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return any(layer.seq_len > 0 for layer in self.layers)

    @property
    def is_linear(self) -> list[bool]:
        # False on purpose: generate then slices the prompt by `get_seq_length`, which counts every token
        return [False] * len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def __repr__(self) -> str:
        return f"MCCache(layers={len(self.layers)}, seq_len={self.get_seq_length()})"
