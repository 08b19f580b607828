"""Loading a transformers checkpoint directory for `mcrnn train` (`train.init_from`) and `mcrnn eval --model`.

A directory written by `save_pretrained` holds either a plain model (e.g. a Mamba-2 from the hub) or one saved
after :func:`mcrnn.add_memory_caching` (its `config.json` has `memory_caching`). :func:`load_checkpoint_model`
loads either one, with the Memory Caching settings a run asks for, and every error names the field of the
run's config (or the command-line option) that has to change.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from mcrnn.pretrained.settings import CONFIG_KEY, MCSettings

__all__ = ["settings_from", "checkpoint_config", "load_checkpoint_model", "check_vocab"]


def settings_from(raw, field: str) -> MCSettings:
    """An :class:`MCSettings` from a mapping of its fields (a YAML section, `--mc.*` options); a ValueError names
    `field` (e.g. ``memory_caching.top_k``) on a bad one."""
    if not isinstance(raw, dict):
        raise ValueError(f"{field}: expected a mapping of Memory Caching settings, got {type(raw).__name__}")
    known = list(MCSettings.__dataclass_fields__)
    for key in raw:
        if key not in known:
            raise ValueError(f"{field}.{key}: unknown key (known: {', '.join(known)})")
    for key in ("aggregation", "segment_size"):
        if key not in raw:
            raise ValueError(f"{field}.{key}: required (e.g. aggregation: grm, segment_size: 2048)")
    try:
        return MCSettings(**raw)
    except ValueError as e:
        bad = next((k for k in known if f"`{k}`" in str(e)), None)
        raise ValueError(f"{field}{'.' + bad if bad else ''}: {e}") from e


def checkpoint_config(path: str | os.PathLike, field: str):
    """The transformers config of the checkpoint directory `path`, or a ValueError naming `field`."""
    from transformers import AutoConfig

    from mcrnn.pretrained import SUPPORTED_MODEL_TYPES

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{field}: {str(path)!r} is not a directory written by save_pretrained (no config.json); "
                         "give a local checkpoint directory")
    config = AutoConfig.from_pretrained(p)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{field}: {path} holds a {model_type!r} model; Memory Caching supports model_type "
                         f"{sorted(SUPPORTED_MODEL_TYPES)}")
    return config


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report lists the `u_proj` weights it skips when an MC checkpoint is read without MC."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_checkpoint_model(path: str | os.PathLike, memory_caching: MCSettings | None = None, *,
                          without_mc: bool = False, dtype: torch.dtype = torch.float32,
                          field: str = "train.init_from", mc_field: str = "memory_caching") -> nn.Module:
    """The model saved in `path` (a `save_pretrained` directory), as a `Mamba2ForCausalLM`.

    - `without_mc`: the backbone alone (a checkpoint's `u_proj` weights and MC settings are dropped).
    - a checkpoint saved with MC: loaded with its settings and trained `u_proj`; `memory_caching` must be None
      or the same settings (a ValueError naming `mc_field` otherwise: new settings would discard what was
      trained).
    - a plain checkpoint: `memory_caching` (if given) is added with :func:`mcrnn.add_memory_caching`; its new
      `u_proj` draws from torch's global generator, so seed it first for a reproducible run.
    Weights load in `dtype` (float32 by default: the trainer's master weights).
    """
    from transformers import AutoModelForCausalLM

    import mcrnn.pretrained as mcp

    config = checkpoint_config(path, field)
    saved = getattr(config, CONFIG_KEY, None)
    if without_mc:
        if saved is not None:
            delattr(config, CONFIG_KEY)
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    if saved is not None:
        saved_settings = MCSettings.from_dict(saved)
        if memory_caching is not None and memory_caching != saved_settings:
            raise ValueError(
                f"{mc_field}: {path} was saved with Memory Caching {saved_settings.to_dict()}, which it keeps (its "
                f"u_proj was trained for them); drop {mc_field}, or start from the plain checkpoint")
        return mcp.from_pretrained(path, config=config, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    if memory_caching is not None:
        try:
            mcp.add_memory_caching(model, **memory_caching.to_dict())
        except ValueError as e:
            raise ValueError(f"{mc_field}: {e}") from e
    return model


def check_vocab(model: nn.Module, vocab_size: int, tokenizer_field: str, tokenizer: str, path) -> None:
    """A ValueError naming `tokenizer_field` if the model's vocabulary cannot embed the tokenizer's ids."""
    have = int(model.config.vocab_size)
    if have < vocab_size:
        raise ValueError(f"{tokenizer_field}: the {tokenizer!r} tokenizer has {vocab_size} tokens but the model at "
                         f"{path} embeds only vocab_size={have}; choose a tokenizer with at most {have} tokens "
                         "(data.tokenizer: byte needs 258, bpe needs data.bpe_vocab_size)")
