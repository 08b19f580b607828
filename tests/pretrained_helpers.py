"""What the tests of the transformers adapters (tests/test_pretrained_*.py) share: inputs, an adapted copy with
trained-looking MC parameters, prefill-then-decode and greedy generation."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

import mcrnn
import mcrnn.pretrained as mcp


def random_ids(B: int, T: int, vocab: int, seed: int = 1) -> torch.Tensor:
    """`[B, T]` token ids in `[3, vocab)` (the low ids stay free for special tokens)."""
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def adapted(base, seed: int = 2, **settings):
    """A copy of `base` with MC; a scored aggregation gets random (as if trained) `u_proj` weights."""
    model = mcrnn.add_memory_caching(copy.deepcopy(base), **settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mcp.mc_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@torch.no_grad()
def prefill_and_decode(model, x: torch.Tensor, n_prefill: int, cache=None, hidden: bool = False) -> torch.Tensor:
    """Logits of `x` from a prefill of `n_prefill` tokens, then one token at a time through `cache` (default: a
    fresh `DynamicCache`, updated in place). `hidden`: the last hidden states instead (float64 in a float64
    model, where transformers' logits are float32)."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    outs = [model(x[:, :n_prefill], cache=cache, use_cache=True, output_hidden_states=hidden)]
    for t in range(n_prefill, x.shape[1]):
        outs.append(model(x[:, t:t + 1], cache=cache, use_cache=True, output_hidden_states=hidden))
    return torch.cat([o.hidden_states[-1] if hidden else o.logits for o in outs], dim=1)


def greedy(model, prompt, max_new_tokens: int, use_cache: bool = True, **kw):
    """Greedy `generate` with its scores (`return_dict_in_generate`)."""
    return model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kw)
