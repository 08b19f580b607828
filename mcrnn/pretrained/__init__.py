"""Memory Caching for pretrained transformers models (issue 13).

```python
from transformers import AutoModelForCausalLM
import mcrnn
model = AutoModelForCausalLM.from_pretrained(path)                        # a Mamba2ForCausalLM
model = mcrnn.add_memory_caching(model, aggregation="ssc", top_k=4, segment_size=2048, init="independent")
model.generate(ids, max_new_tokens=64)                                      # the cache holds the MC state
model.save_pretrained("mc_ckpt")                                            # config.memory_caching + u_proj
model = mcrnn.pretrained.from_pretrained("mc_ckpt")                         # back, with its MC settings
```

Only the recurrence of each recurrent mixer goes through :func:`mcrnn.ops.memory_caching`; everything else is
transformers' own computation on the model's own weights. See docs/pretrained.md.

Importing this package imports transformers (`import mcrnn.ops` never does).
"""

from __future__ import annotations

import os

from torch import nn

from mcrnn.pretrained.settings import AGGREGATIONS, CONFIG_KEY, INITS, SEGMENTATIONS, MCSettings

#: model classes with an adapter (transformers class name -> the module of its adapter)
SUPPORTED_MODELS = {
    "Mamba2ForCausalLM": "mamba2", "Mamba2Model": "mamba2",
    "Qwen3NextForCausalLM": "qwen3_next", "Qwen3NextModel": "qwen3_next",
}
#: config `model_type`s that :func:`from_pretrained` loads (through `AutoModelForCausalLM`)
SUPPORTED_MODEL_TYPES = {"mamba2": "Mamba2ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}
#: the transformers releases the adapters are tested with, `[low, high)`: the adapters copy the torch path of
#: each mixer, which transformers changes between releases (the Mamba-2 cache API changed within 5.x)
TESTED_TRANSFORMERS = ("5.24.0", "5.26.0")

__all__ = [
    "add_memory_caching", "from_pretrained", "mc_parameters", "freeze_backbone", "memory_caching_settings",
    "MCSettings", "SUPPORTED_MODELS", "TESTED_TRANSFORMERS", "AGGREGATIONS", "SEGMENTATIONS", "INITS",
]


def installed_transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str | None = None) -> None:
    """ValueError unless the installed transformers (or `version`) is in :data:`TESTED_TRANSFORMERS`."""
    from packaging.version import Version

    if version is None:
        version = installed_transformers_version()
    lo, hi = TESTED_TRANSFORMERS
    v = Version(version)
    if not Version(lo) <= Version(v.base_version) < Version(hi):
        raise ValueError(
            f"transformers {version} is not a version the Memory Caching adapters are tested with: "
            f"install transformers>={lo},<{hi} (`pip install 'transformers>={lo},<{hi}'`)"
        )


def _adapter(model: nn.Module):
    """The adapter module for `model`'s class, or a ValueError naming the supported classes."""
    import importlib

    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ValueError(
            f"Memory Caching has no adapter for {name}: supported are {sorted(SUPPORTED_MODELS)} "
            "(mcrnn's own MCForCausalLM takes MC settings in its config)"
        )
    check_transformers_version()
    adapter = importlib.import_module(f"mcrnn.pretrained.{SUPPORTED_MODELS[name]}")
    if not isinstance(model, adapter.MODEL_CLASSES):  # a class of the same name from elsewhere
        raise ValueError(f"{type(model).__module__}.{name} is not transformers' {name}")
    return adapter


def add_memory_caching(
    model: nn.Module,
    *,
    aggregation: str,
    segment_size: int,
    segmentation: str = "constant",
    init: str = "checkpoint",
    top_k: int | None = None,
    use_u: bool = True,
    u_init_std: float = 1e-2,
) -> nn.Module:
    """Route the recurrence of every recurrent mixer of a pretrained transformers model through Memory Caching.

    In place: the model keeps its class (e.g. `Mamba2ForCausalLM`) and its weights; its mixers change class
    and, for scored aggregations with `use_u`, gain a trainable `u_proj` (the MC parameters, see
    :func:`mc_parameters`). `config.memory_caching` records the settings, so `save_pretrained` writes them and
    :func:`from_pretrained` restores the model. Returns `model`.

    Args:
        model: a `Mamba2ForCausalLM`, `Mamba2Model`, `Qwen3NextForCausalLM` or `Qwen3NextModel` (see
            :data:`SUPPORTED_MODELS`; Qwen3-Next: its Gated DeltaNet layers get MC, its attention layers not).
        aggregation: "none" (the base model, exactly) | "residual" | "grm" | "soup" | "ssc" | "mean".
        segment_size: tokens per segment ("constant") or per unit ("logarithmic"); counted from the first token
            of each sequence, padding included.
        segmentation: "constant" | "logarithmic".
        init: "checkpoint" (the memory runs on; caches are snapshots) | "independent" (each segment starts from
            a zero state: `mean` + `independent` with the training length is the paper's post-training MC).
        top_k: cached memories each token reads (`ssc` only, required there).
        use_u: scored aggregations (grm, soup, ssc) score the caches with `u = x W_u` (new `u_proj` per mixer)
            if True, with `u = q = C` (nothing to train) if False.
        u_init_std: size of `u` at initialisation (0: exactly uniform mixing weights at the start).
    """
    adapter = _adapter(model)
    settings = MCSettings(aggregation=aggregation, segment_size=segment_size, segmentation=segmentation,
                          init=init, top_k=top_k, use_u=use_u, u_init_std=u_init_std)
    if getattr(model.config, CONFIG_KEY, None) is not None or any(
        isinstance(getattr(m, "mc", None), MCSettings) for m in adapter.mixers(model)
    ):
        raise ValueError(
            f"this model already has Memory Caching (`config.{CONFIG_KEY}` = {getattr(model.config, CONFIG_KEY)}): "
            "load a saved MC model with mcrnn.pretrained.from_pretrained(path), which restores its settings and "
            "its trained u_proj; add Memory Caching to a model without it"
        )
    _apply(model, adapter, settings)
    return model


def _apply(model: nn.Module, adapter, settings: MCSettings) -> None:
    for mixer in adapter.mixers(model):
        adapter.adapt_mixer(mixer, settings)
    setattr(model.config, CONFIG_KEY, settings.to_dict())


def memory_caching_settings(model: nn.Module) -> MCSettings | None:
    """The MC settings of an adapted model (None if it has none)."""
    d = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return MCSettings.from_dict(d) if d is not None else None


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a model saved after :func:`add_memory_caching`, with its MC settings and trained `u_proj`.

    `path`: a local directory (or hub id) written by `save_pretrained`; `kwargs` go to transformers'
    `from_pretrained` (e.g. `dtype=torch.bfloat16`, `device_map`). The weights load through transformers'
    own loader (sharding, dtypes, devices), into a model that has the MC mixers before its weights arrive.
    Returns the model, of its usual class (e.g. `Mamba2ForCausalLM`). A checkpoint without
    `config.memory_caching` raises a ValueError (load it with `AutoModelForCausalLM.from_pretrained`).
    """
    import importlib

    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    settings_dict = getattr(config, CONFIG_KEY, None)
    if settings_dict is None:
        raise ValueError(
            f"{path} has no `{CONFIG_KEY}` in its config, so it was not saved with Memory Caching: load it with "
            "transformers' AutoModelForCausalLM.from_pretrained and call mcrnn.add_memory_caching"
        )
    settings = MCSettings.from_dict(settings_dict)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Memory Caching has no adapter for model_type {model_type!r}: supported are "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )
    check_transformers_version()
    class_name = SUPPORTED_MODEL_TYPES[model_type]
    adapter = importlib.import_module(f"mcrnn.pretrained.{SUPPORTED_MODELS[class_name]}")
    base = next(c for c in adapter.MODEL_CLASSES if c.__name__ == class_name)

    def __init__(self, config, *args, **kw):
        base.__init__(self, config, *args, **kw)
        _apply(self, adapter, settings)

    # a throw-away subclass whose constructor adds the MC mixers, so that transformers loads u_proj with the
    # rest of the weights; the loaded model then gets its usual class back
    loader = type(class_name, (base,), {"__init__": __init__, "__module__": __name__})
    model = loader.from_pretrained(path, config=config, **kwargs)
    model.__class__ = base
    return model


def mc_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The MC parameters of an adapted model by name (the `u_proj` weights; empty for parameter-free settings)."""
    if memory_caching_settings(model) is None:
        raise ValueError("the model has no Memory Caching: call mcrnn.add_memory_caching first")
    return {n: p for n, p in model.named_parameters() if _is_mc_parameter(n)}


def _is_mc_parameter(name: str) -> bool:
    return ".u_proj." in f".{name}"


def freeze_backbone(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze every parameter except the MC ones (`requires_grad`); return the MC parameters by name.

    Post-training MC: pass the returned `.values()` to the optimizer. Empty for parameter-free settings
    (`none`, `residual`, `mean`, or `use_u=False`), which need no training.
    """
    trainable = mc_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return trainable
