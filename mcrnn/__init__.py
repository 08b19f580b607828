"""mcrnn: Memory Caching for recurrent sequence models (Behrouz et al., arXiv 2602.24281).

`import mcrnn` stays light: the HF model classes load on first access.
"""

__version__ = "0.1.0"

_LAZY = {
    "MCConfig": "mcrnn.models",
    "MCForCausalLM": "mcrnn.models",
    "MCModel": "mcrnn.models",
    "add_memory_caching": "mcrnn.pretrained",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcrnn' has no attribute {name!r}")
