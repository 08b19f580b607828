"""The token mixers: short convolution, RoPE, MemoryCachingAttention and Attention (shapes, gradients,
decoding through the cache, padding)."""

import pytest
import torch

from mcrnn.layers import Attention, MCCache, MemoryCachingAttention, ShortConvolution
from mcrnn.layers.utils import rotary
from mcrnn.ops import MEMORIES, get_memory

D, H = 32, 2


def _memory_or_skip(name):
    try:
        return get_memory(name)
    except ValueError:
        pytest.skip(f"memory {name!r} is not registered")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _mc(memory="linear", aggregation="grm", **kw):
    kw.setdefault("segment_size", 4)
    kw.setdefault("mini_batch", 2)
    layer = MemoryCachingAttention(D, H, memory=memory, aggregation=aggregation, top_k=1, layer_idx=0, **kw)
    with torch.no_grad():  # non-trivial gates and output norm so that the checks below can fail
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def test_short_convolution_continues_across_calls():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 11, 6)
    full, _ = conv(x)
    for cut in (1, 2, 5, 10):
        a, st = conv(x[:, :cut])
        b, _ = conv(x[:, cut:], st)
        torch.testing.assert_close(torch.cat([a, b], 1), full)
    # causal: token t depends on t-3..t only
    y, _ = conv(torch.cat([torch.randn(2, 4, 6), x[:, 4:]], 1))
    torch.testing.assert_close(y[:, 7:], full[:, 7:])
    assert not torch.allclose(y[:, 4:7], full[:, 4:7])


def test_rotary_scores_depend_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    pos = lambda p: torch.tensor([[p]])
    s1 = (rotary(q, pos(5), 1e4) * rotary(k, pos(2), 1e4)).sum()
    s2 = (rotary(q, pos(13), 1e4) * rotary(k, pos(10), 1e4)).sum()
    s3 = (rotary(q, pos(13), 1e4) * rotary(k, pos(2), 1e4)).sum()
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, s3)
    torch.testing.assert_close(rotary(q, pos(0), 1e4), q)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
@pytest.mark.parametrize("aggregation", ["none", "grm", "ssc"])
def test_mc_layer_forward_backward(memory, aggregation):
    _memory_or_skip(memory)
    torch.manual_seed(0)
    layer = _mc(memory, aggregation)
    x = torch.randn(2, 11, D, requires_grad=True)
    o, attn, cache = layer(x)
    assert o.shape == x.shape and attn is None and cache is None
    o.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert (layer.u_proj is not None) == (aggregation in ("grm", "ssc"))
    assert set(layer.gates) == set(get_memory(memory).gate_names)
    assert bool(layer.memory_params) == get_memory(memory).deep


def test_mc_layer_causal():
    torch.manual_seed(0)
    layer = _mc("swla", "grm")
    x = torch.randn(1, 12, D)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 5, D)
    torch.testing.assert_close(layer(x)[0][:, :7], layer(y)[0][:, :7])
    assert not torch.allclose(layer(x)[0][:, 7:], layer(y)[0][:, 7:])


def test_u_projection_only_where_scores_are_read():
    for agg, use_u, has in [("none", True, False), ("mean", True, False), ("residual", True, False),
                            ("grm", True, True), ("soup", True, True), ("grm", False, False)]:
        layer = MemoryCachingAttention(D, H, aggregation=agg, use_u=use_u)
        assert (layer.u_proj is not None) == has, (agg, use_u)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_mc_layer_chunks_with_cache_equal_forward(memory):
    _memory_or_skip(memory)
    torch.manual_seed(0)
    layer = _mc(memory, "grm")
    x = torch.randn(2, 13, D)
    full = layer(x)[0]
    cache = MCCache(num_layers=1)
    outs = []
    for a, b in [(0, 5), (5, 6), (6, 9), (9, 10), (10, 13)]:  # mid-segment, boundaries, single tokens
        o, _, cache = layer(x[:, a:b], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert cache.get_seq_length() == 13
    assert _rel(torch.cat(outs, 1), full) < 1e-4


def test_layer_idx_is_required_with_a_cache():
    layer = MemoryCachingAttention(D, H)
    with pytest.raises(ValueError, match="layer_idx"):
        layer(torch.randn(1, 3, D), past_key_values=MCCache(num_layers=1), use_cache=True)
    with pytest.raises(ValueError, match="layer_idx"):
        Attention(D, H)(torch.randn(1, 3, D), past_key_values=MCCache(num_layers=1), use_cache=True)


def test_bad_mask_raises():
    layer = MemoryCachingAttention(D, H, layer_idx=0)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 3, D), attention_mask=torch.ones(2, 1, 3, 3))


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_mc_left_padding_writes_nothing(memory):
    """The base RNN (aggregation none, checkpoint, mini-batch 1): a left-padded sequence gives the real tokens
    exactly the outputs of the unpadded one, whatever the padded inputs are, so padding wrote nothing."""
    _memory_or_skip(memory)
    torch.manual_seed(0)
    layer = _mc(memory, "none", mini_batch=1)
    x = torch.randn(1, 9, D)
    pad = 100 * torch.randn(1, 4, D)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    o = layer(torch.cat([pad, x], 1), attention_mask=mask)[0]
    torch.testing.assert_close(o[:, 4:], layer(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_masked_token_leaves_the_memory_unchanged(memory):
    """A masked token after real ones (its convolution window holds real tokens, so its k and v would not be
    zero by themselves) changes none of the memory's weights."""
    _memory_or_skip(memory)
    torch.manual_seed(0)
    layer = _mc(memory, "none", mini_batch=1)
    cache = MCCache(num_layers=1)
    x = torch.randn(1, 6, D)
    layer(x[:, :5], past_key_values=cache, use_cache=True)
    before = {n: t.clone() for n, t in layer.mem.readable(cache[0].mc.online).items()}
    layer(x[:, 5:], attention_mask=torch.tensor([[1] * 5 + [0]]), past_key_values=cache, use_cache=True)
    after = layer.mem.readable(cache[0].mc.online)
    assert cache.get_seq_length() == 6
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=1e-7)
    layer(x[:, 5:], past_key_values=cache, use_cache=True)  # the same token unmasked does write
    assert any(not torch.allclose(layer.mem.readable(cache[0].mc.online)[n], before[n]) for n in before)


@pytest.mark.parametrize("conv_size", [0, 4])
def test_attention_decode_and_padding(conv_size):
    torch.manual_seed(0)
    layer = Attention(D, H, layer_idx=0, conv_size=conv_size)
    x = torch.randn(2, 10, D)
    full = layer(x)[0]
    cache = MCCache(num_layers=1)
    outs = []
    for a, b in [(0, 3), (3, 4), (4, 8), (8, 9), (9, 10)]:
        o, _, cache = layer(x[:, a:b], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert _rel(torch.cat(outs, 1), full) < 1e-5
    assert cache[0].keys.shape == (2, H, 10, D // H)
    # left padding: padded keys are never attended and positions count kept tokens only
    pad = 100 * torch.randn(2, 3, D)
    mask = torch.tensor([[0] * 3 + [1] * 10] * 2)
    o = layer(torch.cat([pad, x], 1), attention_mask=mask)[0]
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o[:, 3:], full, rtol=1e-5, atol=1e-5)
    # causal
    y = x.clone()
    y[:, 6:] = 0
    torch.testing.assert_close(layer(y)[0][:, :6], full[:, :6])


def test_attention_short_convolution_mixes_the_previous_tokens():
    torch.manual_seed(0)
    layer = Attention(D, H, layer_idx=0, conv_size=2)
    x = torch.randn(1, 6, D)
    y = x.clone()
    y[:, 2] = 0  # token 3 sees token 2 through its key and value convolution, token 4 only through attention
    a, b = layer(x)[0], layer(y)[0]
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 3], b[:, 3])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="conv_size"):
            Attention(D, H, conv_size=bad)
