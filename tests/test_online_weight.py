"""`mean` with a fixed online weight (`MCSpec.online_weight`): the parallel path against the token-loop
reference, the decode step, its limits, the model field and bad values."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, grads, make_inputs, slice_gates

from mcrnn.models import MCConfig, MCForCausalLM
from mcrnn.ops import MCSpec, memory_caching, memory_caching_step, naive_memory_caching
from mcrnn.ops.mc import make_options

TOL = 1e-10


def _spec(**kw):
    base = dict(memory="linear", aggregation="mean", segment_size=8, init="independent", online_weight=0.3)
    return MCSpec(**{**base, **kw})


@pytest.mark.parametrize("T", [1, 63, 100, 257])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("segmentation", ["constant", "logarithmic"])
def test_parallel_matches_reference(T, init, segmentation):
    q, k, v, u, gates = make_inputs(2, T, 3, 4, 5, ("decay",))
    spec = _spec(init=init, segmentation=segmentation, segment_size=8 if segmentation == "constant" else 3)
    o1, s1 = naive_memory_caching(q, k, v, u, gates=gates, spec=spec, output_final_state=True)
    o2, s2 = memory_caching(q, k, v, u, gates=gates, spec=spec, output_final_state=True)
    assert_close(o2, o1, TOL, "output")
    assert_close(s2.online["S"], s1.online["S"], TOL, "online state")
    w = torch.randn_like(o1)
    for a, b, name in zip(grads(o2, [q, k, v, *gates.values()], w), grads(o1, [q, k, v, *gates.values()], w),
                          ["q", "k", "v", "decay"]):
        assert_close(a, b, TOL, f"d{name}")


def test_weights_are_the_online_share_and_an_even_split():
    q, k, v, u, gates = make_inputs(1, 24, 2, 4, 4, ("decay",), grad=False)
    kw = dict(gates=gates, output_final_state=False)
    base = memory_caching(q, k, v, u, spec=_spec(aggregation="none", online_weight=None), **kw)[0]
    assert_close(memory_caching(q, k, v, u, spec=_spec(online_weight=1.0), **kw)[0], base, TOL, "w = 1: no cache")
    # the first segment has no cache: every weight gives the base memory there
    assert_close(memory_caching(q, k, v, u, spec=_spec(), **kw)[0][:, :8], base[:, :8], TOL, "first segment")
    # w = 1/(N + 1) with one cache (tokens 8..15) is the uniform mean
    o_half = memory_caching(q, k, v, u, spec=_spec(online_weight=0.5), **kw)[0]
    o_mean = memory_caching(q, k, v, u, spec=_spec(online_weight=None), **kw)[0]
    assert_close(o_half[:, 8:16], o_mean[:, 8:16], TOL, "one cache")
    assert not torch.allclose(o_half[:, 16:], o_mean[:, 16:])  # two caches: 1/2 is not 1/3


def test_decode_step_equals_parallel():
    T, prefill = 30, 11
    q, k, v, u, gates = make_inputs(2, T, 2, 4, 4, ("decay",), grad=False)
    spec = _spec(segment_size=4)
    o, _ = memory_caching(q, k, v, u, gates=gates, spec=spec)
    _, state = memory_caching(q[:, :prefill], k[:, :prefill], v[:, :prefill], u[:, :prefill],
                              gates=slice_gates(gates, 0, prefill), spec=spec, output_final_state=True)
    opts = make_options(spec=spec, scale=None, score_scale=None, params=None, boundaries=None, K=4, V=4, H=2)
    for t in range(prefill, T):
        o_t, state = memory_caching_step(state, q[:, t], k[:, t], v[:, t], u[:, t],
                                         gates={n: g[:, t] for n, g in gates.items()}, opts=opts)
        assert_close(o_t, o[:, t], 1e-12, f"token {t}")


def test_model_field_and_bad_values():
    cfg = MCConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_heads=2, aggregation="mean",
                   init="independent", segment_size=4, online_weight=0.25)
    assert cfg.mc_spec.online_weight == 0.25
    x = torch.randint(0, 30, (1, 13))
    assert torch.isfinite(MCForCausalLM(cfg)(input_ids=x).logits).all()
    for bad, match in ((0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (True, "a number"), ("half", "a number")):
        with pytest.raises(ValueError, match=match):
            _spec(online_weight=bad)
    with pytest.raises(ValueError, match="applies to aggregation='mean' only"):
        _spec(aggregation="grm")
