"""The Memory Caching decode state inside a transformers cache.

transformers 5 keeps the state of a Mamba-2 mixer in a `LinearAttentionLayer` of the model's `Cache`
(`DynamicCache(config=...)`, made by `generate` or by the model's forward): a conv state and a recurrent state
`[B, H, head_dim, d_state]`. An adapted mixer needs more than that state: the cached memories, their key sums
and the segment counters, i.e. an :class:`~mcrnn.ops.MCState`. The first time an adapted mixer meets its cache
layer, it puts in that layer's place an object of the same class with :class:`MCStateLayerMixin` mixed in,
holding the same attributes (the same tensors) and one more, `mc_state`. Whoever made the cache (`generate`,
the model, the user) keeps a working object, and the cache's own operations (reset, beam-search reorder, batch
selection, offloading) carry the MC state with the conv state. The recurrent-state slot stays empty: the
online memory lives in the MC state.
"""

from __future__ import annotations

import torch

from mcrnn.ops import MCState


class MCStateLayerMixin:
    """Mixed into a transformers linear-attention cache layer: holds the MC decode state of one mixer.

    Attributes:
        mc_state: the :class:`~mcrnn.ops.MCState` after the tokens seen so far (None before the first call).
    """

    mc_state: MCState | None = None

    def reset(self) -> None:
        super().reset()
        self.mc_state = None

    def _map_mc(self, fn) -> None:
        if self.mc_state is not None:
            self.mc_state = self.mc_state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_mc(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        parent = getattr(super(), "batch_repeat_interleave", None)
        if parent is not None:
            parent(repeats)
        else:  # transformers' linear-attention layers do not define it: repeat their states here
            self._map_conv(lambda x: x.repeat_interleave(repeats, dim=0))
        self._map_mc(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        parent = getattr(super(), "batch_select_indices", None)
        if parent is not None:
            parent(indices)
        else:
            self._map_conv(lambda x: x[indices])
        self._map_mc(lambda x: x[indices.to(x.device) if isinstance(indices, torch.Tensor) else indices])

    def _map_conv(self, fn) -> None:
        for i, x in self.conv_states.items():
            if x is not None:
                self.conv_states[i] = fn(x)

    def offload(self) -> None:
        super().offload()
        self._map_mc(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.device is not None:
            self._map_mc(lambda x: x.to(self.device, non_blocking=True))

    @property
    def is_croppable(self) -> bool:
        # a memory cannot forget its last tokens, and the caches cannot be un-made
        return False if self.mc_state is not None else super().is_croppable

    @property
    def is_compileable(self) -> bool:
        return False  # the MC state grows (one more cache per segment)

    def crop(self, tokens_to_remove: int) -> None:
        if self.mc_state is not None:
            raise ValueError(
                "a Memory Caching state cannot be cropped (a recurrent memory cannot forget tokens): "
                "assisted generation and cache rollback are not supported with Memory Caching"
            )
        super().crop(tokens_to_remove)


_LAYER_CLASSES: dict[type, type] = {}


def mc_layer_class(base: type) -> type:
    """`base` with :class:`MCStateLayerMixin` mixed in (one class per base, made once)."""
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"MemoryCaching{base.__name__}", (MCStateLayerMixin, base), {})
    return _LAYER_CLASSES[base]


def mc_cache_layer(cache, layer_idx: int):
    """The layer of `cache` for mixer `layer_idx`, made able to hold an MC state (in place, once)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise ValueError(
            f"the cache has no layer {layer_idx} for this Memory Caching mixer: pass a cache made from the model's "
            "config (`DynamicCache(config=model.config)`), or none (the model makes one)"
        )
    layer = layers[layer_idx]
    if isinstance(layer, MCStateLayerMixin):
        return layer
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        raise ValueError(
            f"cache layer {layer_idx} is a {type(layer).__name__}, not a linear-attention layer: pass a cache made "
            "from the model's config (`DynamicCache(config=model.config)`)"
        )
    if any(layer.has_previous_state.values()):
        raise ValueError(
            f"cache layer {layer_idx} already holds a state written without Memory Caching: start the sequence "
            "with the adapted model (a fresh cache)"
        )
    # a new object of the mixed class with the same attributes (the same tensors) takes the layer's place
    mixed = mc_layer_class(type(layer))
    new = mixed.__new__(mixed)
    new.__dict__.update(layer.__dict__)
    new.mc_state = None
    layers[layer_idx] = new
    return new
