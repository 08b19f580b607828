"""Training: the config (:mod:`.config`), deterministic batches (:mod:`.data`), the loop (:mod:`.trainer`).

See ``docs/training.md``.
"""

from .config import Config, DataConfig, TrainConfig, load_config, parse_overrides, validate
from .trainer import evaluate, load_checkpoint, lr_factor, save_checkpoint, train

__all__ = [
    "Config", "DataConfig", "TrainConfig", "load_config", "parse_overrides", "validate", "train", "evaluate",
    "load_checkpoint", "save_checkpoint", "lr_factor",
]
