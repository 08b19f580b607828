"""Decoding through MCCache equals the parallel forward; generate (greedy, beams, left padding)."""

import pytest
import torch

from mcrnn import MCConfig, MCForCausalLM
from mcrnn.layers import MCCache
from mcrnn.ops import get_memory

V = 64


def tiny(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2, segment_size=4, mini_batch=2,
                pad_token_id=0, bos_token_id=None, eos_token_id=None)
    base.update(kw)
    return MCConfig(**base)


@pytest.fixture(autouse=True)
def _no_grad():
    # generate runs without autograd; so do these checks (faster, same numbers)
    with torch.no_grad():
        yield


def model_of(**kw):
    torch.manual_seed(0)
    model = MCForCausalLM(tiny(**kw)).eval()
    with torch.no_grad():  # non-trivial gates, scores and norms, so that a wrong state shows in the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def decode_logits(model, ids, prompt, attention_mask=None, chunks=None):
    """Prefill `prompt` tokens with the parallel path, then feed the rest one token at a time (or in
    `chunks`), returning the logits of every position."""
    T = ids.shape[1]
    mask = attention_mask
    out = model(ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt], use_cache=True)
    logits, cache = [out.logits], out.cache
    assert isinstance(cache, MCCache) and cache.get_seq_length() == prompt
    t = prompt
    for step in chunks or [1] * (T - prompt):
        m = None if mask is None else mask[:, : t + step]  # the full 2-D mask, as generate passes it
        out = model(ids[:, t:t + step], attention_mask=m, cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
        t += step
    assert cache.get_seq_length() == T
    return torch.cat(logits, 1)


AGGREGATIONS = ["none", "residual", "grm", "soup", "ssc", "mean"]


@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_decode_equals_forward_linear(aggregation, init):
    model = model_of(aggregation=aggregation, init=init, top_k=1)
    ids = torch.randint(1, V, (2, 15))
    full = model(ids).logits
    # prompts that end mid-segment (5, 7) and on a boundary (8); decoding crosses boundaries 8 and 12
    for prompt in (5, 7, 8):
        assert _rel(decode_logits(model, ids, prompt), full) < 1e-4, prompt


@pytest.mark.parametrize("memory,aggregation,segmentation,init", [
    ("swla", "grm", "constant", "checkpoint"), ("swla", "ssc", "logarithmic", "independent"),
    ("linear", "grm", "logarithmic", "checkpoint"), ("linear", "residual", "logarithmic", "independent"),
    ("dla", "grm", "constant", "independent"), ("titans", "ssc", "constant", "checkpoint"),
    ("titans", "mean", "constant", "independent"),
])
def test_decode_equals_forward_memories(memory, aggregation, segmentation, init):
    try:
        get_memory(memory)
    except ValueError:
        pytest.skip(f"memory {memory!r} is not registered")
    model = model_of(memory=memory, aggregation=aggregation, segmentation=segmentation, init=init, top_k=1,
                     segment_size=2 if segmentation == "logarithmic" else 4)
    ids = torch.randint(1, V, (2, 13))
    full = model(ids).logits
    assert _rel(decode_logits(model, ids, 5), full) < 1e-4
    # continuing with several tokens per call goes through the same op
    assert _rel(decode_logits(model, ids, 3, chunks=[2, 1, 4, 1, 2]), full) < 1e-4


@pytest.mark.parametrize("mixer", ["attention", ["attention", "mc"]])
@pytest.mark.parametrize("attention_conv_size", [0, 3])
def test_decode_equals_forward_attention_and_hybrid(mixer, attention_conv_size):
    model = model_of(mixer=mixer, attention_conv_size=attention_conv_size)
    ids = torch.randint(1, V, (2, 13))
    full = model(ids).logits
    assert _rel(decode_logits(model, ids, 6), full) < 1e-4


@pytest.mark.parametrize(
    "mixer,memory,attention_conv_size", [("mc", "linear", 0), ("mc", "swla", 0), ("mc", "dla", 0),
                                         ("attention", "linear", 0), ("attention", "linear", 4),
                                         (["mc", "attention"], "titans", 0)]
)
def test_left_padding_decode_equals_forward(mixer, memory, attention_conv_size):
    try:
        get_memory(memory)
    except ValueError:
        pytest.skip(f"memory {memory!r} is not registered")
    model = model_of(mixer=mixer, memory=memory, attention_conv_size=attention_conv_size)
    ids = torch.randint(1, V, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    full = model(ids, attention_mask=mask).logits
    dec = decode_logits(model, ids, 7, attention_mask=mask)
    keep = mask.bool()
    assert _rel(dec[keep], full[keep]) < 1e-4
    assert torch.isfinite(dec).all()


@pytest.mark.parametrize("mixer", ["mc", "attention", ["mc", "attention"]])
def test_greedy_generate_with_and_without_cache(mixer):
    model = model_of(mixer=mixer, aggregation="grm")
    ids = torch.randint(1, V, (2, 7))
    a = model.generate(ids, max_new_tokens=9, do_sample=False, use_cache=True)
    b = model.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False)
    assert a.shape == (2, 16)
    assert torch.equal(a, b)
    assert len(set(a[0, 7:].tolist())) > 1  # not a degenerate constant continuation


def test_generate_left_padded_batch():
    model = model_of(aggregation="grm")
    ids = torch.randint(1, V, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    assert torch.equal(seq, model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                           use_cache=False))
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    full = model(seq, attention_mask=full_mask).logits[:, 7:-1]
    assert _rel(torch.stack(out.logits, 1), full) < 1e-4


def test_cache_reorder_permutes_the_batch():
    model = model_of(mixer=["mc", "attention"], aggregation="grm")
    ids = torch.randint(1, V, (3, 9))
    cache = model(ids, use_cache=True).cache
    mc_before = cache[0].mc
    conv_before, keys_before = cache[0].conv.clone(), cache[1].keys.clone()
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    assert torch.equal(cache[0].conv, conv_before[idx]) and torch.equal(cache[1].keys, keys_before[idx])
    for name, x in cache[0].mc.online.items():
        assert torch.equal(x, mc_before.online[name][idx])
    assert torch.equal(cache[0].mc.cache_key_sum, mc_before.cache_key_sum[idx])
    assert cache.batch_size == 3
    # decoding from the reordered cache equals decoding row idx of the original batch
    nxt = torch.randint(1, V, (3, 1))
    fresh = model(torch.cat([ids[idx], nxt], 1)).logits[:, -1:]
    # a cache passed with use_cache=False is read but not advanced
    peek = model(nxt, cache=cache, use_cache=False)
    assert peek.cache is None and cache.get_seq_length() == 9
    reordered = model(nxt, cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == 10
    assert _rel(reordered, fresh) < 1e-4 and _rel(peek.logits, fresh) < 1e-4
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert cache.batch_size == 2


@pytest.mark.parametrize("mixer", ["mc", ["attention", "mc"]])
def test_beam_search(mixer):
    model = model_of(mixer=mixer, aggregation="grm")
    ids = torch.randint(1, V, (2, 6))
    a = model.generate(ids, max_new_tokens=7, num_beams=2, do_sample=False, use_cache=True)
    b = model.generate(ids, max_new_tokens=7, num_beams=2, do_sample=False, use_cache=False)
    assert a.shape == (2, 13)
    assert torch.equal(a, b)
    seqs = model.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False)
    assert seqs.shape == (6, 11)


def test_sampling_runs():
    model = model_of(aggregation="ssc", top_k=1)
    ids = torch.randint(1, V, (2, 5))
    torch.manual_seed(1)
    out = model.generate(ids, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, 11)
