"""Hugging Face-compatible mcrnn models; importing this module registers them with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from mcrnn.layers.cache import MCCache
from mcrnn.models.configuration_mcrnn import MCConfig
from mcrnn.models.modeling_mcrnn import MCBlock, MCForCausalLM, MCModel, MCPreTrainedModel, causal_lm_loss

AutoConfig.register(MCConfig.model_type, MCConfig, exist_ok=True)
AutoModel.register(MCConfig, MCModel, exist_ok=True)
AutoModelForCausalLM.register(MCConfig, MCForCausalLM, exist_ok=True)

__all__ = ["MCConfig", "MCModel", "MCForCausalLM", "MCPreTrainedModel", "MCBlock", "MCCache", "causal_lm_loss"]
