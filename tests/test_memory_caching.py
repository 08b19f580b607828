"""Memory Caching: the parallel path against the token-loop reference, the SPEC invariants, chaining,
the decode step, bad input and low precision."""

import dataclasses

import pytest
import torch
from helpers import assert_close, grads, make_inputs, slice_gates
from hypothesis import given, settings
from hypothesis import strategies as st

from mcrnn.ops import (
    AGGREGATIONS,
    MEMORIES,
    chunk_linear,
    memory_caching,
    memory_caching_step,
    naive_memory_caching,
)
from mcrnn.ops.mc import make_options

# every registered memory without learned parameters is checked by the shared tests below (a new one too)
GATES = {n: m.gate_names for n, m in MEMORIES.items() if not m.deep}
SHALLOW = sorted(GATES)
TOL = 1e-10


def _compare_states(s1, s2, tol=TOL):
    assert (s1.seg_len, s1.position, s1.units) == (s2.seg_len, s2.position, s2.units)
    assert s1.cache_count == s2.cache_count and s1.cache_level == s2.cache_level
    for n in s1.online:
        assert_close(s2.online[n], s1.online[n], tol, f"online[{n}]")
    for n in s1.cache:
        assert_close(s2.cache[n], s1.cache[n], tol, f"cache[{n}]")
    assert_close(s2.cache_key_sum, s1.cache_key_sum, tol, "cache_key_sum")
    assert_close(s2.key_sum, s1.key_sum, tol, "key_sum")
    assert len(s1.levels) == len(s2.levels)
    for a, b in zip(s2.levels, s1.levels):
        for n in a:
            assert_close(a[n], b[n], tol, "levels")


def _check_parallel_vs_naive(T, memory, aggregation, init, segmentation, C, boundaries=None, K=4, V=5, top_k=2):
    q, k, v, u, gates = make_inputs(2, T, 3, K, V, GATES[memory])
    kw = dict(memory=memory, gates=gates, segment_size=C, segmentation=segmentation, boundaries=boundaries,
              init=init, aggregation=aggregation, top_k=top_k, output_final_state=True)
    o1, s1 = naive_memory_caching(q, k, v, u, **kw)
    o2, s2 = memory_caching(q, k, v, u, **kw)
    assert_close(o2, o1, TOL, "output")
    _compare_states(s1, s2)
    w = torch.randn_like(o1)
    leaves = [q, k, v, u, *gates.values()]
    for a, b, name in zip(grads(o2, leaves, w), grads(o1, leaves, w), ["q", "k", "v", "u", *gates]):
        assert_close(a, b, TOL, f"d{name}")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("segmentation, C", [("constant", 8), ("logarithmic", 3)])
@pytest.mark.parametrize("memory", SHALLOW)
def test_parallel_matches_reference(memory, aggregation, init, segmentation, C):
    _check_parallel_vs_naive(37, memory, aggregation, init, segmentation, C)


@pytest.mark.parametrize("T", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("aggregation, init", [("grm", "checkpoint"), ("ssc", "independent"), ("soup", "independent"),
                                               ("residual", "checkpoint")])
def test_odd_lengths(T, aggregation, init):
    _check_parallel_vs_naive(T, "linear", aggregation, init, "constant", 16, K=3, V=6)


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "mean"])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_boundaries_and_long_segments(aggregation, init):
    _check_parallel_vs_naive(300, "swla", aggregation, init, "boundaries", 1, boundaries=[1, 2, 40, 299, 300])
    _check_parallel_vs_naive(300, "linear", aggregation, init, "constant", 280)  # a segment split over blocks


@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_per_token_logarithmic(init):
    """C = 1 is the per-token Fenwick form of the paper (Log-Linear++ with `grm`)."""
    _check_parallel_vs_naive(70, "linear", "grm", init, "logarithmic", 1)


# --- SPEC §2.3 invariants -------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("memory", SHALLOW)
def test_one_segment_is_the_base_memory(memory, aggregation):
    q, k, v, u, gates = make_inputs(2, 50, 2, 4, 4, GATES[memory], grad=False)
    o_mc, _ = memory_caching(q, k, v, u, memory=memory, gates=gates, segment_size=64, aggregation=aggregation,
                             top_k=1)
    o_base, _ = memory_caching(q, k, v, u, memory=memory, gates=gates, segment_size=64, aggregation="none")
    from mcrnn.ops import chunk_delta, chunk_gdn, chunk_swla

    base = {"linear": chunk_linear, "swla": chunk_swla, "delta": chunk_delta, "gdn": chunk_gdn}[memory]
    o_ref, _ = base(q, k, v, **gates)
    assert_close(o_base, o_ref, 1e-12)
    assert_close(o_mc, o_ref, 1e-12)


def test_residual_independent_linear_is_linear_attention():
    q, k, v, u, _ = make_inputs(2, 100, 3, 4, 6, grad=False)
    o_mc, _ = memory_caching(q, k, v, u, segment_size=16, init="independent", aggregation="residual")
    o_la, _ = chunk_linear(q, k, v)
    assert_close(o_mc, o_la, 1e-12)


@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("memory", SHALLOW)
def test_soup_equals_grm_for_linear_memories(memory, init):
    q, k, v, u, gates = make_inputs(2, 90, 2, 4, 4, GATES[memory], grad=False)
    kw = dict(memory=memory, gates=gates, segment_size=10, init=init)
    assert_close(memory_caching(q, k, v, u, aggregation="soup", **kw)[0],
                 memory_caching(q, k, v, u, aggregation="grm", **kw)[0], 1e-12)
    # the reference mixes the states themselves: an independent check of the identity
    assert_close(naive_memory_caching(q, k, v, u, aggregation="soup", **kw)[0],
                 naive_memory_caching(q, k, v, u, aggregation="grm", **kw)[0], 1e-12)


@pytest.mark.parametrize("segmentation, C", [("constant", 10), ("logarithmic", 4)])
def test_ssc_with_enough_slots_is_grm(segmentation, C):
    T = 90
    q, k, v, u, gates = make_inputs(2, T, 2, 4, 4, ("decay",), grad=False)
    kw = dict(gates=gates, segment_size=C, segmentation=segmentation)
    n_caches = T // C  # at most N - 1 caches are ever visible
    assert_close(memory_caching(q, k, v, u, aggregation="ssc", top_k=n_caches, **kw)[0],
                 memory_caching(q, k, v, u, aggregation="grm", **kw)[0], 1e-12)
    o_small, _ = memory_caching(q, k, v, u, aggregation="ssc", top_k=1, **kw)
    assert (o_small - memory_caching(q, k, v, u, aggregation="grm", **kw)[0]).abs().max() > 1e-6


def test_u_defaults_to_q():
    q, k, v, _, _ = make_inputs(1, 40, 2, 4, 4, grad=False)
    assert_close(memory_caching(q, k, v, segment_size=8)[0], memory_caching(q, k, v, q, segment_size=8)[0], 0)


def test_causality():
    q, k, v, u, gates = make_inputs(1, 60, 2, 4, 4, ("decay",), grad=False)
    o, _ = memory_caching(q, k, v, u, gates=gates, segment_size=7, aggregation="grm")
    k2 = k.clone()
    k2[:, 30:] += 1.0
    o2, _ = memory_caching(q, k2, v, u, gates=gates, segment_size=7, aggregation="grm")
    assert_close(o2[:, :30], o[:, :30], 0)
    assert (o2[:, 30:] - o[:, 30:]).abs().max() > 1e-6


# --- continuing a sequence ------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["grm", "ssc", "mean"])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("segmentation, C", [("constant", 8), ("logarithmic", 2)])
@pytest.mark.parametrize("memory", SHALLOW)
def test_chaining_equals_one_call(memory, aggregation, init, segmentation, C):
    T = 45
    q, k, v, u, gates = make_inputs(2, T, 2, 4, 3, GATES[memory], grad=False)
    kw = dict(memory=memory, segment_size=C, segmentation=segmentation, init=init, aggregation=aggregation,
              top_k=2, output_final_state=True)
    o, s = memory_caching(q, k, v, u, gates=gates, **kw)
    for cuts in ([16], [3, 4, 21], [1, 2, 3, 40, 44]):  # on and off segment boundaries
        outs, state, t0 = [], None, 0
        for t1 in cuts + [T]:
            part = [x[:, t0:t1] for x in (q, k, v, u)]
            o_p, state = memory_caching(*part, gates=slice_gates(gates, t0, t1), initial_state=state, **kw)
            outs.append(o_p)
            t0 = t1
        assert_close(torch.cat(outs, 1), o, 1e-12, f"chained output {cuts}")
        _compare_states(s, state, 1e-12)


def test_chaining_with_boundaries():
    T = 50
    q, k, v, u, gates = make_inputs(1, T, 2, 4, 3, ("decay",), grad=False)
    kw = dict(segmentation="boundaries", init="independent", aggregation="grm", output_final_state=True)
    o, s = memory_caching(q, k, v, u, gates=gates, boundaries=[5, 20, 21, 50], **kw)
    oa, sa = memory_caching(q[:, :12], k[:, :12], v[:, :12], u[:, :12], gates=slice_gates(gates, 0, 12),
                            boundaries=[5], **kw)
    ob, sb = memory_caching(q[:, 12:], k[:, 12:], v[:, 12:], u[:, 12:], gates=slice_gates(gates, 12, T),
                            boundaries=[8, 9, 38], initial_state=sa, **kw)
    assert_close(torch.cat([oa, ob], 1), o, 1e-12)
    _compare_states(s, sb, 1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("segmentation", ["constant", "logarithmic"])
def test_decode_step_equals_parallel(aggregation, segmentation):
    """Prefill with the parallel path, then decode token by token with the step function."""
    T, prefill = 40, 13
    q, k, v, u, gates = make_inputs(2, T, 2, 4, 4, ("decay", "prev", "cur"), grad=False)
    kw = dict(memory="swla", segment_size=4, segmentation=segmentation, init="independent",
              aggregation=aggregation, top_k=1)
    o, _ = memory_caching(q, k, v, u, gates=gates, **kw)
    _, state = memory_caching(q[:, :prefill], k[:, :prefill], v[:, :prefill], u[:, :prefill],
                              gates=slice_gates(gates, 0, prefill), output_final_state=True, **kw)
    opts = make_options(**{n: x for n, x in kw.items()}, scale=None, score_scale=None, params=None,
                        mini_batch=None, boundaries=None, K=4, V=4, H=2)
    head = lambda x, t: x[:, t].double()
    for t in range(prefill, T):
        o_t, state = memory_caching_step(state, head(q, t), head(k, t), head(v, t), head(u, t),
                                         gates={n: g[:, t] for n, g in gates.items()}, opts=opts)
        assert_close(o_t, o[:, t], 1e-12, f"token {t}")
    # one-token calls of the parallel entry point are a decode step too
    _, state = memory_caching(q[:, :prefill], k[:, :prefill], v[:, :prefill], u[:, :prefill],
                              gates=slice_gates(gates, 0, prefill), output_final_state=True, **kw)
    for t in range(prefill, T):
        o_t, state = memory_caching(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], u[:, t:t + 1],
                                    gates=slice_gates(gates, t, t + 1), initial_state=state,
                                    output_final_state=True, **kw)
        assert_close(o_t[:, 0], o[:, t], 1e-12, f"token {t}")


def test_state_map_reorders_the_batch():
    q, k, v, u, _ = make_inputs(3, 20, 2, 4, 4, grad=False)
    _, s = memory_caching(q, k, v, u, segment_size=6, output_final_state=True)
    idx = torch.tensor([2, 0, 1])
    s2 = s.map(lambda x: x.index_select(0, idx))
    _, s_ref = memory_caching(q[idx], k[idx], v[idx], u[idx], segment_size=6, output_final_state=True)
    _compare_states(s_ref, s2, 1e-14)
    assert dataclasses.is_dataclass(s2)


def test_initial_state_gradients_flow():
    q, k, v, u, gates = make_inputs(1, 30, 2, 4, 4, ("decay",))
    _, s = memory_caching(q[:, :17], k[:, :17], v[:, :17], u[:, :17], gates=slice_gates(gates, 0, 17),
                          segment_size=5, output_final_state=True)
    o2, _ = naive_memory_caching(q[:, 17:], k[:, 17:], v[:, 17:], u[:, 17:], gates=slice_gates(gates, 17, 30),
                                 segment_size=5, initial_state=s)
    o1, _ = memory_caching(q[:, 17:], k[:, 17:], v[:, 17:], u[:, 17:], gates=slice_gates(gates, 17, 30),
                           segment_size=5, initial_state=s)
    w = torch.randn_like(o1)
    leaves = [q, k, v, u, gates["decay"]]
    for a, b in zip(grads(o1, leaves, w), grads(o2, leaves, w)):
        assert_close(a, b, TOL)


# --- properties over random shapes and segmentations ----------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 40), H=st.integers(1, 3), K=st.integers(1, 5), V=st.integers(1, 5),
    C=st.integers(1, 12), seg=st.sampled_from(["constant", "logarithmic"]),
    init=st.sampled_from(["checkpoint", "independent"]), agg=st.sampled_from(AGGREGATIONS),
    top_k=st.integers(1, 4), memory=st.sampled_from(SHALLOW), seed=st.integers(0, 10_000),
)
def test_property_parallel_equals_reference(T, H, K, V, C, seg, init, agg, top_k, memory, seed):
    q, k, v, u, gates = make_inputs(2, T, H, K, V, GATES[memory], grad=False, seed=seed)
    kw = dict(memory=memory, gates=gates, segment_size=C, segmentation=seg, init=init, aggregation=agg,
              top_k=top_k, output_final_state=True)
    o1, s1 = naive_memory_caching(q, k, v, u, **kw)
    o2, s2 = memory_caching(q, k, v, u, **kw)
    assert_close(o2, o1, TOL)
    _compare_states(s1, s2)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 60), data=st.data())
def test_property_random_boundaries(T, data):
    ends = sorted(data.draw(st.sets(st.integers(1, T), max_size=8)))
    q, k, v, u, gates = make_inputs(1, T, 2, 3, 3, ("decay",), grad=False, seed=T)
    kw = dict(gates=gates, segmentation="boundaries", boundaries=ends, aggregation="grm",
              init=data.draw(st.sampled_from(["checkpoint", "independent"])), output_final_state=True)
    o1, s1 = naive_memory_caching(q, k, v, u, **kw)
    o2, s2 = memory_caching(q, k, v, u, **kw)
    assert_close(o2, o1, TOL)
    _compare_states(s1, s2)


# --- dtypes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
def test_low_precision_inputs(dtype, tol, aggregation):
    q, k, v, u, gates = make_inputs(2, 130, 2, 16, 16, ("decay",), grad=False)
    kw = dict(gates=gates, segment_size=16, aggregation=aggregation, top_k=2)
    o_ref, _ = naive_memory_caching(q, k, v, u, **kw)
    cast = lambda x: x.to(dtype)
    o, s = memory_caching(cast(q), cast(k), cast(v), cast(u), **{**kw, "gates": {"decay": cast(gates["decay"])}},
                          output_final_state=True)
    assert o.dtype == dtype and s.online["S"].dtype == torch.float32
    assert_close(o, o_ref, tol)


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
def test_64k_tokens_bf16_stays_finite(aggregation):
    B, T, H, K = 1, 65536, 2, 32
    g = torch.Generator().manual_seed(0)
    q, k, v, u = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).bfloat16()
                  for _ in range(4))
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g) + 4).bfloat16()
    for x in (q, k, v, u):
        x.requires_grad_()
    o, _ = memory_caching(q, k, v, u, gates={"decay": decay}, segment_size=256, aggregation=aggregation, top_k=4)
    assert torch.isfinite(o.float()).all()
    o.float().square().mean().backward()
    assert all(torch.isfinite(x.grad.float()).all() for x in (q, k, v, u))


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(memory="lstm"), "unknown `memory`"),
        (dict(aggregation="sum"), "unknown `aggregation`"),
        (dict(segmentation="fixed"), "unknown `segmentation`"),
        (dict(init="zeros"), "unknown `init`"),
        (dict(segment_size=0), "`segment_size` must be an integer >= 1"),
        (dict(segment_size=2.5), "`segment_size`"),
        (dict(aggregation="ssc"), "`top_k` is required"),
        (dict(aggregation="ssc", top_k=0), "`top_k` must be an integer >= 1"),
        (dict(gates={"decay": torch.full((2, 10, 3), 2.0)}), "gate `decay` must lie in"),
        (dict(gates={"forget": torch.rand(2, 10, 3)}), "unknown names"),
        (dict(gates={"decay": torch.rand(2, 9, 3)}), "gate `decay` must have shape"),
        (dict(segmentation="boundaries"), "needs `boundaries`"),
        (dict(segmentation="boundaries", boundaries=[5, 3]), "strictly increasing"),
        (dict(segmentation="boundaries", boundaries=[0, 3]), r"lie in \[1, T=10\]"),
        (dict(segmentation="boundaries", boundaries=[4, 11]), r"lie in \[1, T=10\]"),
        (dict(boundaries=[4]), "use segmentation='boundaries'"),
        (dict(u=torch.randn(2, 10, 3, 5)), "`u` must have the shape of `q`"),
        (dict(params={"W": torch.zeros(3, 4, 4)}), "no learned initial state"),
        (dict(initial_state="state"), "must be the MCState"),
        (dict(mini_batch=0), "`mini_batch` must be an integer >= 1"),
    ],
)
@pytest.mark.parametrize("fn", [memory_caching, naive_memory_caching])
def test_bad_input_names_the_argument(fn, kwargs, match):
    x = torch.randn(2, 10, 3, 4)
    kwargs = dict(kwargs)
    u = kwargs.pop("u", None)
    with pytest.raises(ValueError, match=match):
        fn(x, x, x, u, **kwargs)


def test_continuing_with_other_settings_is_an_error():
    x = torch.randn(1, 10, 2, 4)
    _, s = memory_caching(x, x, x, segment_size=4, output_final_state=True)
    with pytest.raises(ValueError, match="same memory, segmentation, segment_size and init"):
        memory_caching(x, x, x, segment_size=8, initial_state=s)
    with pytest.raises(ValueError, match="batch/heads/key dims"):
        memory_caching(x[:, :, :1], x[:, :, :1], x[:, :, :1], segment_size=4, initial_state=s)


# --- deep memories under Memory Caching -----------------------------------------------------------------

DEEP_GATES = {"dla": ("lr", "decay"), "titans": ("lr", "momentum", "forget")}


def _deep_inputs(memory, T, H=2, K=4, E=8, depth=2, seed=0, weight=0.4):
    q, k, v, u, gates = make_inputs(2, T, H, K, K, DEEP_GATES[memory], seed=seed, grad=False)
    # unit keys and small steps keep the inner gradient descent stable (else both paths overflow alike)
    k = torch.nn.functional.normalize(k, dim=-1)
    gates["lr"] = gates["lr"] * 0.3
    q, k, v, u = (x.requires_grad_() for x in (q, k, v, u))
    gates = {n: x.requires_grad_() for n, x in gates.items()}
    g = torch.Generator().manual_seed(seed + 1)
    if depth == 2:
        params = {"W1": torch.randn(H, K, E, generator=g, dtype=torch.float64) * weight,
                  "W2": torch.randn(H, E, K, generator=g, dtype=torch.float64) * weight}
    else:
        params = {"W": torch.randn(H, K, K, generator=g, dtype=torch.float64) * weight}
    return q, k, v, u, gates, {n: x.requires_grad_() for n, x in params.items()}


@pytest.mark.parametrize("memory", ["dla", "titans"])
@pytest.mark.parametrize("aggregation", ["grm", "soup", "ssc", "residual"])
@pytest.mark.parametrize("init, segmentation", [("checkpoint", "constant"), ("independent", "logarithmic")])
def test_deep_parallel_matches_reference(memory, aggregation, init, segmentation):
    q, k, v, u, gates, params = _deep_inputs(memory, 29)
    kw = dict(memory=memory, params=params, gates=gates, mini_batch=2, segment_size=4, segmentation=segmentation,
              init=init, aggregation=aggregation, top_k=1, output_final_state=True)
    o1, s1 = naive_memory_caching(q, k, v, u, **kw)
    o2, s2 = memory_caching(q, k, v, u, **kw)
    assert_close(o2, o1, TOL, "output")
    _compare_states(s1, s2)
    w = torch.randn_like(o1)
    leaves = [q, k, v, u, *params.values(), *gates.values()]
    for a, b_ in zip(grads(o2, leaves, w), grads(o1, leaves, w)):
        assert_close(a, b_, TOL, "gradient")


@pytest.mark.parametrize("memory", ["dla", "titans"])
def test_soup_differs_from_grm_on_deep_memories(memory):
    q, k, v, u, gates, params = _deep_inputs(memory, 40, weight=0.7)
    kw = dict(memory=memory, params=params, gates=gates, mini_batch=4, segment_size=8)
    soup, _ = memory_caching(q, k, v, u, aggregation="soup", **kw)
    grm, _ = memory_caching(q, k, v, u, aggregation="grm", **kw)
    assert (soup - grm).abs().max() > 1e-4
    assert_close(soup[:, :8], grm[:, :8], 1e-12)  # one segment: both are the online memory


@pytest.mark.parametrize("memory", ["dla", "titans"])
def test_soup_equals_grm_for_depth_one(memory):
    q, k, v, u, gates, params = _deep_inputs(memory, 30, depth=1)
    kw = dict(memory=memory, params=params, gates=gates, mini_batch=2, segment_size=6)
    assert_close(memory_caching(q, k, v, u, aggregation="soup", **kw)[0],
                 memory_caching(q, k, v, u, aggregation="grm", **kw)[0], 1e-12)


@pytest.mark.parametrize("memory", ["dla", "titans"])
@pytest.mark.parametrize("aggregation", ["soup", "ssc"])
def test_deep_chaining_and_decode(memory, aggregation):
    T, cut = 23, 9
    q, k, v, u, gates, params = _deep_inputs(memory, T)
    kw = dict(memory=memory, params=params, mini_batch=2, segment_size=4, aggregation=aggregation, top_k=1,
              init="independent", output_final_state=True)
    with torch.no_grad():
        o, s = memory_caching(q, k, v, u, gates=gates, **kw)
        oa, sa = memory_caching(q[:, :cut], k[:, :cut], v[:, :cut], u[:, :cut], gates=slice_gates(gates, 0, cut),
                                **kw)
        outs, state = [oa], sa
        for t in range(cut, T):
            o_t, state = memory_caching(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], u[:, t:t + 1],
                                        gates=slice_gates(gates, t, t + 1), initial_state=state, **kw)
            outs.append(o_t)
    assert_close(torch.cat(outs, 1), o, 1e-12)
    _compare_states(s, state, 1e-12)


def test_segment_size_must_be_a_multiple_of_the_mini_batch():
    q, k, v, u, gates, params = _deep_inputs("titans", 10)
    with pytest.raises(ValueError, match="multiple of `mini_batch`"):
        memory_caching(q, k, v, u, memory="titans", params=params, gates=gates, mini_batch=4, segment_size=6)


@pytest.mark.parametrize("ratio", [0, 1000])
def test_ssc_grouped_and_dense_reads_agree_with_reference(monkeypatch, ratio):
    """SSC reads the selected caches through tiles (many caches) or densely (few): both match the loop."""
    import importlib

    aggregations = importlib.import_module("mcrnn.ops.mc.aggregations")
    monkeypatch.setattr(aggregations, "DENSE_SSC_RATIO", ratio)
    monkeypatch.setattr(aggregations, "DENSE_SSC_STATE", ratio)
    _check_parallel_vs_naive(90, "linear", "ssc", "independent", "constant", 3, top_k=2)


# --- input-only scores: `summary_keys` (the ablation of the paper's context-dependent gates) ------------

def _summary_inputs(T, Ks, B=2, H=2, seed=7):
    """Random summary keys and score queries `[B, T, H, Ks]` (leaf tensors, float64)."""
    g = torch.Generator().manual_seed(seed)
    s, u = (torch.randn(B, T, H, Ks, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    return s, u


def _positions(B, T, H, C, t0=0):
    """The layer's input-only summary keys: absolute position / segment size, `[B, T, H, 1]`."""
    pos = torch.arange(t0, t0 + T, dtype=torch.float64) / C
    return pos.view(1, T, 1, 1).expand(B, T, H, 1)


@pytest.mark.parametrize("T", [1, 63, 100])
@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("segmentation, C", [("constant", 8), ("logarithmic", 3)])
def test_summary_keys_parallel_matches_reference(T, aggregation, init, segmentation, C):
    Ks = 1 if segmentation == "constant" else 3  # the layer's scalar position and a wider summary
    q, k, v, _, gates = make_inputs(2, T, 2, 4, 5, ("decay",))
    s, u = _summary_inputs(T, Ks)
    kw = dict(gates=gates, segment_size=C, segmentation=segmentation, init=init, aggregation=aggregation,
              top_k=2, summary_keys=s, output_final_state=True)
    o1, s1 = naive_memory_caching(q, k, v, u, **kw)
    o2, s2 = memory_caching(q, k, v, u, **kw)
    assert_close(o2, o1, TOL, "output")
    _compare_states(s1, s2)
    assert s2.key_sum.shape == (2, 2, Ks) and s2.cache_key_sum.shape[-1] == Ks
    w = torch.randn_like(o1)
    leaves = [q, k, v, u, s, gates["decay"]]
    g2, g1 = grads(o2, leaves, w), grads(o1, leaves, w)
    for a, b, name in zip(g2, g1, ["q", "k", "v", "u", "summary_keys", "decay"]):
        assert_close(a, b, TOL, f"d{name}")
    if T > C:  # the scores read the summaries: gradients reach them
        assert g2[4].abs().max() > 0 and g2[3].abs().max() > 0


@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
@pytest.mark.parametrize("segmentation, C", [("constant", 8), ("logarithmic", 2)])
def test_summary_keys_chaining_and_decode(aggregation, segmentation, C):
    """Positions as summary keys (what the layer passes): two calls with the state, and token-by-token decoding
    from a prefilled state, equal one call."""
    B, T, H = 2, 45, 2
    q, k, v, _, gates = make_inputs(B, T, H, 4, 3, ("decay",), grad=False)
    _, u = _summary_inputs(T, 1, B, H)
    u = u.detach()
    s = _positions(B, T, H, C)
    kw = dict(segment_size=C, segmentation=segmentation, init="independent", aggregation=aggregation, top_k=1,
              output_final_state=True)
    o, st_full = memory_caching(q, k, v, u, gates=gates, summary_keys=s, **kw)
    for cut in (16, 21):  # on and off a segment boundary
        a = [x[:, :cut] for x in (q, k, v, u)]
        b = [x[:, cut:] for x in (q, k, v, u)]
        oa, sa = memory_caching(*a, gates=slice_gates(gates, 0, cut), summary_keys=s[:, :cut], **kw)
        ob, sb = memory_caching(*b, gates=slice_gates(gates, cut, T), summary_keys=s[:, cut:], initial_state=sa,
                                **kw)
        assert_close(torch.cat([oa, ob], 1), o, 1e-12, f"chained output at {cut}")
        _compare_states(st_full, sb, 1e-12)
    prefill = 13
    _, state = memory_caching(*(x[:, :prefill] for x in (q, k, v, u)), gates=slice_gates(gates, 0, prefill),
                              summary_keys=s[:, :prefill], **kw)
    opts = make_options(memory="linear", aggregation=aggregation, segmentation=segmentation, segment_size=C,
                        init="independent", top_k=1, scale=None, score_scale=None, params=None, mini_batch=None,
                        boundaries=None, K=4, V=3, H=H, Ks=1)
    step_state = state
    for t in range(prefill, T):
        o_t, step_state = memory_caching_step(step_state, q[:, t], k[:, t], v[:, t], u[:, t],
                                              gates={"decay": gates["decay"][:, t]}, opts=opts,
                                              summary_keys=s[:, t])
        assert_close(o_t, o[:, t], 1e-12, f"step token {t}")
        o_t, state = memory_caching(*(x[:, t:t + 1] for x in (q, k, v, u)), gates=slice_gates(gates, t, t + 1),
                                    summary_keys=s[:, t:t + 1], initial_state=state, **kw)
        assert_close(o_t[:, 0], o[:, t], 1e-12, f"one-token call {t}")
    _compare_states(st_full, state, 1e-12)
    _compare_states(st_full, step_state, 1e-12)


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "residual"])
def test_summary_keys_none_is_the_keys(aggregation):
    q, k, v, u, gates = make_inputs(2, 50, 2, 4, 4, ("decay",))
    kw = dict(gates=gates, segment_size=6, aggregation=aggregation, top_k=2, output_final_state=True)
    o1, s1 = memory_caching(q, k, v, u, **kw)
    o2, s2 = memory_caching(q, k, v, u, summary_keys=k, **kw)
    assert_close(o2, o1, 0, "output")
    _compare_states(s1, s2, 0)
    w = torch.randn_like(o1)
    leaves = [q, k, v, u, gates["decay"]]
    for a, b in zip(grads(o2, leaves, w), grads(o1, leaves, w)):
        assert_close(a, b, 1e-14)


@pytest.mark.parametrize(
    "u_dim, s_shape, match",
    [
        (4, (2, 10, 3, 2), r"`u` must have shape \[B, T, H, Ks\].*`summary_keys`"),
        (None, (2, 10, 3, 2), "`u` is required with `summary_keys`"),
        (2, (2, 9, 3, 2), "`summary_keys` must have shape"),
        (2, (2, 10, 3), "`summary_keys` must have shape"),
    ],
)
@pytest.mark.parametrize("fn", [memory_caching, naive_memory_caching])
def test_summary_keys_bad_shapes_name_the_argument(fn, u_dim, s_shape, match):
    x = torch.randn(2, 10, 3, 4)
    u = torch.randn(2, 10, 3, u_dim) if u_dim else None
    with pytest.raises(ValueError, match=match):
        fn(x, x, x, u, summary_keys=torch.randn(s_shape))


def test_summary_keys_of_another_dim_cannot_continue_a_state():
    x = torch.randn(1, 10, 2, 4)
    _, s = memory_caching(x, x, x, torch.randn(1, 10, 2, 1), summary_keys=torch.randn(1, 10, 2, 1), segment_size=4,
                          output_final_state=True)
    with pytest.raises(ValueError, match="summary keys"):
        memory_caching(x, x, x, segment_size=4, initial_state=s)


def test_backend_choice():
    """`backend` is validated like every setting; a backend whose kernels cannot run here falls back to the
    PyTorch path (the same result, never a wrong one); MCRNN_BACKEND sets the default."""
    x = torch.randn(1, 40, 2, 8)
    with pytest.raises(ValueError, match="`backend`"):
        memory_caching(x, x, x, segment_size=8, backend="cuda")
    ref, _ = memory_caching(x, x, x, segment_size=8, backend="torch")
    for backend in ("auto", "triton"):  # CPU tensors: auto is the torch path; triton runs only if it can
        o, _ = memory_caching(x, x, x, segment_size=8, backend=backend)
        assert_close(o, ref, 2e-5, backend)


def test_backend_from_the_environment(monkeypatch):
    x = torch.randn(1, 20, 2, 4)
    monkeypatch.setenv("MCRNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MCRNN_BACKEND"):
        memory_caching(x, x, x, segment_size=8)
    monkeypatch.setenv("MCRNN_BACKEND", "torch")
    memory_caching(x, x, x, segment_size=8)
