"""Checks of the arguments every deep memory takes: its learned initial weights, the mini-batch size, the offset."""

from __future__ import annotations

import torch


def check_params(params, H: int, K: int, V: int) -> tuple[str, ...]:
    """`params = {"W1": [H, V, E], "W2": [H, E, K]}` (K == V) or `{"W": [H, V, K]}`; returns its keys."""
    if not isinstance(params, dict):
        raise ValueError(
            f"`params` must be a dict {{'W1': [H, V, E], 'W2': [H, E, K]}} or {{'W': [H, V, K]}}, "
            f"got {type(params).__name__}"
        )
    keys = set(params)
    for name in keys:
        x = params[name]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`params['{name}']` must be a 3-dim floating tensor, got {got}")
    if keys == {"W"}:
        shapes = {"W": (H, V, K)}
    elif keys == {"W1", "W2"}:
        if K != V:
            raise ValueError(f"`params` W1/W2 (the residual MLP) needs K == V, got K={K}, V={V} (see `v`)")
        E = params["W1"].shape[-1]
        shapes = {"W1": (H, V, E), "W2": (H, E, K)}
    else:
        raise ValueError(
            f"`params` must have keys {{'W1', 'W2'}} (MLP) or {{'W'}} (depth 1), got {sorted(keys)}"
        )
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            got = list(params[name].shape)
            raise ValueError(f"`params['{name}']` must have shape {list(shape)}, got {got}")
    return tuple(sorted(keys))


def check_mini_batch(mini_batch) -> int:
    if not isinstance(mini_batch, int) or isinstance(mini_batch, bool) or mini_batch < 1:
        raise ValueError(f"`mini_batch` must be an integer >= 1, got {mini_batch!r}")
    return mini_batch


def check_offset(offset, mini_batch: int) -> int:
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < mini_batch:
        raise ValueError(
            f"`offset` (tokens already in the current mini-batch) must be in [0, {mini_batch}), got {offset!r}"
        )
    return offset
