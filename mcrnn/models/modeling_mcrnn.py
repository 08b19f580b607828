"""The mcrnn causal language model: one implementation for Memory Caching, attention and hybrid stacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from mcrnn.data import IGNORE_INDEX
from mcrnn.layers import Attention, MCCache, MemoryCachingAttention, RMSNorm, ShortConvolution
from mcrnn.layers.utils import check_padding_mask
from mcrnn.models.configuration_mcrnn import MCConfig
from mcrnn.ops.mc.state import check_cu_seqlens

try:  # transformers >= 4.52: blocks that `gradient_checkpointing_enable` knows how to checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer as _BlockBase
except ImportError:  # pragma: no cover
    _BlockBase = nn.Module

try:  # respects the `_is_hf_initialized` flags, so loaded weights are never re-initialised
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = nn.init


LOSS_REDUCTIONS = ("mean", "sum", "none")


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy in float32, positions labelled `-100` ignored: the loss of every mcrnn model,
    trainer and evaluation.

    Args:
        logits: `[B, T, V]` (any float dtype; scored in float32).
        labels: `[B, T]` aligned with the inputs (Hugging Face's convention, what `model(labels=...)` takes):
            `logits[:, t]` is scored against `labels[:, t + 1]`, so the last position scores nothing.
        shift_labels: `[B, T]` already shifted (the convention of :mod:`mcrnn.data`): `logits[:, t]` is
            scored against `shift_labels[:, t]`. Give exactly one of `labels` and `shift_labels`.
        reduction: `"mean"` over the labelled positions (NaN when there is none), `"sum"`, or `"none"`:
            the per-position losses `[B, T]` aligned with the shifted labels (0 where ignored, and at the
            last position for `labels`).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("causal_lm_loss: give exactly one of `labels` (aligned with the inputs) and "
                         "`shift_labels` (already shifted)")
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"causal_lm_loss: `reduction` must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 3:
        raise ValueError(f"causal_lm_loss: `logits` must be [B, T, V], got shape {tuple(logits.shape)}")
    given, name = (labels, "labels") if labels is not None else (shift_labels, "shift_labels")
    if given.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_loss: `{name}` must have the shape {tuple(logits.shape[:2])} of the "
                         f"logits' first two dimensions, got {tuple(given.shape)}")
    if labels is not None:  # the target of position t is labels[t + 1]; the last position gets none
        logits, shift_labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
    if reduction != "none":
        return loss
    loss = loss.view(shift_labels.shape)
    return F.pad(loss, (0, 1)) if labels is not None else loss


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`, `[B, T, D] -> [B, T, D]`."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mixer(config: MCConfig, layer_idx: int) -> nn.Module:
    if config.layer_mixers[layer_idx] == "attention":
        return Attention(
            config.hidden_size, config.num_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
            max_position_embeddings=config.max_position_embeddings, layer_idx=layer_idx,
            conv_size=config.attention_conv_size,
        )
    return MemoryCachingAttention(
        config.hidden_size, config.num_heads, head_dim=config.head_dim, head_v_dim=config.head_v_dim,
        spec=config.mc_spec, conv_size=config.conv_size, norm_eps=config.norm_eps, layer_idx=layer_idx,
    )


def packed_cu_seqlens(
    cu_seqlens: torch.Tensor | None, position_ids: torch.Tensor | None, cache
) -> torch.Tensor | None:
    """The `cu_seqlens` of a packed call: the one given, else derived from `position_ids: [1, T]` when they
    restart at 0 inside the row (transformers' `DataCollatorWithFlattening`), else None (not packed)."""
    if cu_seqlens is not None:
        return cu_seqlens
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    if cache is not None and cache.get_seq_length() > 0:
        return None
    starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    T = position_ids.shape[1]
    return torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), T)]).to(torch.int32)


class MCBlock(_BlockBase):
    """Pre-RMSNorm token mixer + residual, pre-RMSNorm SwiGLU MLP + residual. `[B, T, D] -> [B, T, D]`."""

    def __init__(self, config: MCConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = make_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MCCache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, MCCache | None]:
        o, _, past_key_values = self.attn(
            self.attn_norm(hidden_states), attention_mask=attention_mask, past_key_values=past_key_values,
            use_cache=use_cache, **kwargs,
        )
        hidden_states = hidden_states + o
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, past_key_values


class MCGenerationConfig(GenerationConfig):
    """The generation config of the mcrnn models: built from the model config like transformers' own, except
    that the model config's `top_k` is the SSC router size, not the sampling parameter of the same name."""

    @classmethod
    def from_model_config(cls, model_config) -> GenerationConfig:
        d = model_config.to_dict() if not isinstance(model_config, dict) else dict(model_config)
        d.pop("top_k", None)
        return super().from_model_config(d)


class MCPreTrainedModel(PreTrainedModel):
    config_class = MCConfig
    config: MCConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MCBlock"]
    _supports_sdpa = True
    # recurrent states cannot be rolled back: no assisted generation
    _is_stateful = True

    generation_config_class = MCGenerationConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; config fields can be overridden as keywords (e.g.
        `aggregation="mean", init="independent", segment_size=L` for post-training MC, or `top_k`)."""
        if "top_k" in kwargs and kwargs.get("config") is None and args:
            # transformers would also take a `top_k` keyword as the sampling parameter of the generation config:
            # build the model config here, so that it goes to the config only
            top_k = kwargs.pop("top_k")
            config, kwargs = cls.config_class.from_pretrained(args[0], return_unused_kwargs=True, **kwargs)
            config.top_k = top_k
            config.validate()
            kwargs["config"] = config
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                # gate biases start at the memory's "remember" values (`Gate.init_bias`), other biases at 0
                hf_init.constant_(module.bias, getattr(module, "bias_init", 0.0))
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            # unit gain per channel: each output is a sum of `kernel_size` inputs
            hf_init.normal_(module.weight, mean=0.0, std=module.kernel_size**-0.5)
        if isinstance(module, MemoryCachingAttention):
            module.reset_memory_parameters(std, init=hf_init)


class MCModel(MCPreTrainedModel):
    """Embeddings, `num_hidden_layers` :class:`MCBlock`, final RMSNorm. `input_ids: [B, T] -> [B, T, D]`."""

    def __init__(self, config: MCConfig):
        config.validate()
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MCBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MCCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: MCCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """`input_ids: [B, T]` (or `inputs_embeds: [B, T, D]`); `attention_mask: [B, T]` or `[B, past + T]`
        padding mask (1 = keep); `cache` (alias `past_key_values`): an :class:`MCCache` to continue from.
        `cu_seqlens`: packed sequences (`B == 1`, `[0, e_1, ..., T]`), each computed as if it ran alone; without
        it, `position_ids: [1, T]` that restart at 0 (transformers' flattening collator) mark the same.
        Returns `last_hidden_state: [B, T, D]` and, with `use_cache`, the updated cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        cu_seqlens = packed_cu_seqlens(cu_seqlens, position_ids, cache if cache is not None else past_key_values)
        if cu_seqlens is not None:
            if "attention" in self.config.layer_mixers:
                raise ValueError("`cu_seqlens` (packed sequences) needs a model of Memory Caching layers only: "
                                 "the attention layers of hybrid models do not take it yet")
            if use_cache:
                raise ValueError("`cu_seqlens` (packed sequences, or `position_ids` that restart at 0) cannot be "
                                 "combined with `use_cache=True`")
            use_cache = False
            kwargs["cu_seqlens"] = cu_seqlens
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            # training does not need the final states
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MCCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"mcrnn models continue only from an MCCache, got a filled {type(cache).__name__}"
                )
            cache = None  # an empty default cache (e.g. a DynamicCache): replaced by ours
        if use_cache and cache is None:
            cache = MCCache(self.config)
        # a cache passed with use_cache=False is read (the call continues it) but left unchanged

        B, T = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        mask = check_padding_mask(attention_mask, B, T)
        if mask is not None:
            if mask.shape[1] not in (T, past + T):
                raise ValueError(
                    f"`attention_mask` must cover the {T} new tokens or the {past + T} cached and new "
                    "tokens, "
                    f"got {mask.shape[1]}"
                )
            if mask.shape[1] == T and past:
                mask = torch.cat([mask.new_ones(B, past), mask], dim=1)  # the cached tokens were kept
            if bool(mask.all()):
                mask = None  # nothing to mask: the fast paths apply
        if position_ids is None and "attention" in self.config.layer_mixers:
            # RoPE positions count kept tokens only, so a left-padded prompt is positioned as an unpadded one
            if mask is not None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)

        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states, cache = layer(
                hidden_states, attention_mask=mask, past_key_values=cache, use_cache=use_cache,
                position_ids=position_ids, **kwargs,
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        cache = cache if use_cache else None
        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden)


class MCForCausalLM(MCPreTrainedModel, GenerationMixin):
    """:class:`MCModel` + LM head. `forward(input_ids, labels=...)` returns the next-token loss (labels are
    the unshifted input ids, -100 ignored) and logits `[B, T', vocab]` (`T'` from `logits_to_keep`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MCConfig):
        super().__init__(config)
        self.model = MCModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate would build a DynamicCache (a KV cache) by default: build the recurrent cache instead
        if model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None \
                and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"mcrnn models use their own recurrent cache; cache_implementation="
                    f"{generation_config.cache_implementation!r} is not supported"
                )
            model_kwargs["cache"] = MCCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MCCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: MCCache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """`labels: [B, T]` unshifted (token t predicts label t + 1; -100 is ignored; see :func:`causal_lm_loss`).
        `logits_to_keep`: an int n > 0 keeps the logits of the last n tokens, a 1-D tensor keeps those
        positions, 0 keeps all.
        `num_items_in_batch` (from the HF Trainer under gradient accumulation): the loss is the sum over the
        labels divided by it instead of the mean."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        packed = packed_cu_seqlens(kwargs.get("cu_seqlens"), position_ids, cache if cache is not None else
                                   past_key_values)
        if packed is not None and labels is not None:
            # the last token of a packed sequence does not predict the first token of the next one
            starts = check_cu_seqlens(packed, *labels.shape)[1:-1]
            labels = labels.clone()
            labels[:, starts] = IGNORE_INDEX
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True, past_key_values=past_key_values, **kwargs,
        )
        hidden_states = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep]
        logits = self.lm_head(kept)

        loss = None
        if labels is not None:
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"`labels` must have shape {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}"
                )
            full = logits if kept.shape[1] == hidden_states.shape[1] else self.lm_head(hidden_states)
            if num_items_in_batch is None:
                loss = causal_lm_loss(full, labels)
            else:
                loss = causal_lm_loss(full, labels, reduction="sum") / num_items_in_batch
        if not return_dict:
            output = (logits, out.cache, out.hidden_states)
            output = tuple(x for x in output if x is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states
        )
