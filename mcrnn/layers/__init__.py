"""Token mixers (fla layer contract): `forward(hidden_states, attention_mask=None, past_key_values=None,
use_cache=False, **kwargs) -> (o, None, past_key_values)`."""

from mcrnn.layers.attention import Attention
from mcrnn.layers.cache import LayerState, MCCache
from mcrnn.layers.mc_attention import MemoryCachingAttention
from mcrnn.layers.utils import RMSNorm, ShortConvolution

__all__ = ["Attention", "MemoryCachingAttention", "MCCache", "LayerState", "RMSNorm", "ShortConvolution"]
