"""Packed sequences (`cu_seqlens`, SPEC §2.1): a packed call equals running every sequence alone, exactly
(outputs, final states, gradients), for the op, its reference, the layer and the model; bad `cu_seqlens`."""

import functools

import pytest
import torch
from helpers import assert_close, grads, make_inputs, rel_err
from test_memory_caching import GATES, SHALLOW, TOL, _compare_states, _deep_inputs

from mcrnn.ops import AGGREGATIONS, memory_caching, naive_memory_caching
from mcrnn.ops.mc.state import stack_states

LENGTHS = (1, 37, 64, 129)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _pack(x):  # [n, ...] rows of separate sequences -> one packed row
    return None if x is None else x.reshape(1, -1, *x.shape[2:])


def _packed_inputs(lengths, memory, K=4, V=5, H=2, seed=0):
    """One packed row `[1, sum(lengths), H, *]` (leaves) and its per-sequence slices."""
    q, k, v, u, gates = make_inputs(1, sum(lengths), H, K, V, GATES[memory], seed=seed)
    return q, k, v, u, gates


def _check_packed(fn, lengths, memory, aggregation, init, segmentation, C, ref=None, params=None, inputs=None,
                  tol=TOL):
    """`fn` packed vs `ref` (default `fn`) on each sequence alone: outputs, final states, all gradients."""
    ref = ref or fn
    q, k, v, u, gates = inputs if inputs is not None else _packed_inputs(lengths, memory)
    cu = _cu(lengths)
    kw = dict(memory=memory, segment_size=C, segmentation=segmentation, init=init, aggregation=aggregation,
              top_k=2, output_final_state=True, params=params)
    if segmentation == "boundaries":
        kw["boundaries"] = [[b for b in (3, 10, L) if b <= L] for L in lengths]
    # without final states the op runs the packed row in one call (the packed plan); with them, the sequences
    # as rows of unpacked batches: both are checked
    o, none = fn(q, k, v, u, gates=gates, cu_seqlens=cu, **dict(kw, output_final_state=False))
    o_with_states, states = fn(q, k, v, u, gates=gates, cu_seqlens=cu, **kw)
    assert none is None and isinstance(states, list) and len(states) == len(lengths)
    w = torch.randn_like(o)
    leaves = [q, k, v, u, *gates.values(), *(params or {}).values()]
    g_packed = grads(o, leaves, w)
    outs, g_sep = [], [torch.zeros_like(x) for x in leaves]
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        cut = lambda x, s=s, e=e: x[:, s:e]  # noqa: E731
        kw_i = dict(kw, boundaries=kw["boundaries"][i]) if "boundaries" in kw else kw
        o_i, s_i = ref(cut(q), cut(k), cut(v), cut(u), gates={n: cut(g) for n, g in gates.items()}, **kw_i)
        outs.append(o_i)
        _compare_states(s_i, states[i], tol)
        for acc, g in zip(g_sep, grads(o_i, leaves, w[:, s:e])):
            acc += g
    assert_close(o, torch.cat(outs, dim=1), tol, "output")
    assert_close(o_with_states, torch.cat(outs, dim=1), tol, "output (with final states)")
    for a, b, name in zip(g_packed, g_sep, ["q", "k", "v", "u", *gates, *(params or {})]):
        assert_close(a, b, tol, f"d{name}")
    return states


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("segmentation, C", [("constant", 16), ("logarithmic", 8)])
@pytest.mark.parametrize("memory", SHALLOW)  # every registered memory without learned parameters (delta, gdn too)
def test_packed_equals_separate(memory, aggregation, init, segmentation, C):
    _check_packed(memory_caching, LENGTHS, memory, aggregation, init, segmentation, C)


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "soup"])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("memory, mini_batch", [("dla", 1), ("dla", 2), ("titans", 2)])
def test_packed_deep_memory(memory, mini_batch, aggregation, init):
    lengths = (1, 9, 16)
    q, k, v, u, gates, params = _deep_inputs(memory, sum(lengths))
    q, k, v, u = (x[:1].detach().requires_grad_() for x in (q, k, v, u))
    gates = {n: x[:1].detach().requires_grad_() for n, x in gates.items()}
    fn = functools.partial(memory_caching, mini_batch=mini_batch)  # mini-batches counted from each sequence
    _check_packed(fn, lengths, memory, aggregation, init, "constant", 4, params=params, inputs=(q, k, v, u, gates))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
@pytest.mark.parametrize("segmentation, C", [("constant", 8), ("logarithmic", 4), ("boundaries", 1)])
def test_packed_reference_equals_separate_parallel(aggregation, init, segmentation, C):
    """The packed reference (a literal loop) against the parallel path run on each sequence alone."""
    lengths = (1, 13, 30)
    _check_packed(naive_memory_caching, lengths, "swla", aggregation, init, segmentation, C,
                  ref=memory_caching)


def test_packed_per_sequence_boundaries():
    _check_packed(memory_caching, LENGTHS, "linear", "grm", "checkpoint", "boundaries", 1)


@pytest.mark.parametrize("segmentation, C", [("constant", 8), ("logarithmic", 4)])
def test_packed_calls_continue_each_sequence(segmentation, C):
    """Two packed calls (the second from the first's per-sequence states) equal one call per sequence; a
    batch-n state of equal-length sequences continues them packed or unpacked."""
    first, second = (5, 20, 3), (11, 2, 17)
    q, k, v, u, gates = make_inputs(1, sum(first) + sum(second), 2, 4, 5, GATES["swla"])
    kw = dict(memory="swla", segment_size=C, segmentation=segmentation, aggregation="grm",
              output_final_state=True)
    n1 = sum(first)
    cut = lambda x, a, b: x[:, a:b]  # noqa: E731
    o1, s1 = memory_caching(cut(q, 0, n1), cut(k, 0, n1), cut(v, 0, n1), cut(u, 0, n1),
                            gates={n: cut(g, 0, n1) for n, g in gates.items()}, cu_seqlens=_cu(first), **kw)
    T = q.shape[1]
    o2, s2 = memory_caching(cut(q, n1, T), cut(k, n1, T), cut(v, n1, T), cut(u, n1, T),
                            gates={n: cut(g, n1, T) for n, g in gates.items()}, cu_seqlens=_cu(second),
                            initial_state=s1, **kw)
    c1, c2 = _cu(first).tolist(), _cu(second).tolist()
    for i in range(3):
        # sequence i alone: its first part then its second part, one call
        idx = list(range(c1[i], c1[i + 1])) + [n1 + t for t in range(c2[i], c2[i + 1])]
        sel = lambda x, idx=idx: x[:, idx]  # noqa: E731
        o, s = memory_caching(sel(q), sel(k), sel(v), sel(u), gates={n: sel(g) for n, g in gates.items()}, **kw)
        L1 = first[i]
        assert_close(o1[:, c1[i]:c1[i + 1]], o[:, :L1], TOL, "first call")
        assert_close(o2[:, c2[i]:c2[i + 1]], o[:, L1:], TOL, "second call")
        _compare_states(s, s2[i])
    # equal lengths: the per-sequence states stack into one batch-n state that an unpacked call continues
    q, k, v, u, gates = make_inputs(1, 40, 2, 4, 5, GATES["swla"], seed=3)
    _, st = memory_caching(q[:, :20], k[:, :20], v[:, :20], u[:, :20],
                           gates={n: g[:, :20] for n, g in gates.items()}, cu_seqlens=_cu((10, 10)), **kw)
    rows = lambda x: x[:, 20:].reshape(2, 10, *x.shape[2:])  # noqa: E731
    o_b, st_b = memory_caching(rows(q), rows(k), rows(v), rows(u), gates={n: rows(g) for n, g in gates.items()},
                               initial_state=stack_states(st), **kw)
    o_p, st_p = memory_caching(q[:, 20:], k[:, 20:], v[:, 20:], u[:, 20:],
                               gates={n: g[:, 20:] for n, g in gates.items()}, cu_seqlens=_cu((10, 10)),
                               initial_state=stack_states(st), **kw)
    assert_close(o_p, _pack(o_b), TOL, "batch-n state continued packed")
    _compare_states(stack_states(st_p), st_b)


def test_states_of_different_layouts_do_not_stack():
    q, k, v, u, _ = make_inputs(1, 20, 2, 4, 5)
    _, st = memory_caching(q, k, v, u, cu_seqlens=_cu((7, 13)), segment_size=4, output_final_state=True)
    with pytest.raises(ValueError, match="cannot be stacked"):
        stack_states(st)


BAD = [
    (torch.tensor([0.0, 10.0]), "cu_seqlens"),
    (torch.tensor([[0, 10]]), "cu_seqlens"),
    (torch.tensor([0, 6, 4, 10]), "strictly increasing"),
    (torch.tensor([0, 4, 4, 10]), "strictly increasing"),
    (torch.tensor([1, 4, 10]), "start at 0"),
    (torch.tensor([0, 4, 9]), "end at T"),
    ("0,10", "cu_seqlens"),
]


@pytest.mark.parametrize("fn", [memory_caching, naive_memory_caching])
@pytest.mark.parametrize("cu, match", BAD)
def test_bad_cu_seqlens(fn, cu, match):
    q, k, v, u, _ = make_inputs(1, 10, 2, 4, 5, grad=False)
    with pytest.raises(ValueError, match=match) as e:
        fn(q, k, v, u, cu_seqlens=cu)
    assert "cu_seqlens" in str(e.value)


@pytest.mark.parametrize("fn", [memory_caching, naive_memory_caching])
def test_cu_seqlens_needs_one_row(fn):
    q, k, v, u, _ = make_inputs(2, 10, 2, 4, 5, grad=False)
    with pytest.raises(ValueError, match="B == 1"):
        fn(q, k, v, u, cu_seqlens=torch.tensor([0, 4, 10]))


@pytest.mark.parametrize("fn", [memory_caching, naive_memory_caching])
@pytest.mark.parametrize("boundaries", [[3, 8], [[3]], [[3], [2], [1]], [[3], ["a"]]])
def test_packed_boundaries_are_one_list_per_sequence(fn, boundaries):
    q, k, v, u, _ = make_inputs(1, 10, 2, 4, 5, grad=False)
    with pytest.raises(ValueError, match="boundaries"):
        fn(q, k, v, u, cu_seqlens=torch.tensor([0, 4, 10]), segmentation="boundaries", boundaries=boundaries)


def test_packed_initial_state_needs_one_row_per_sequence():
    q, k, v, u, _ = make_inputs(1, 10, 2, 4, 5, grad=False)
    _, st = memory_caching(q, k, v, u, output_final_state=True)
    with pytest.raises(ValueError, match="one row per sequence"):
        memory_caching(q, k, v, u, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=st)


# ---- the layer and the model ---------------------------------------------------------------------------------


#: the layers compute their gates and RMSNorms in float32 (by design) even for float64 inputs: a float64 product
#: over one call or over one sequence can round a gate to the neighbouring float32, and the gradients of those
#: parameters are float32 sums over tokens; reading another sequence would be an O(1) error
LAYER_TOL = 1e-6


@pytest.mark.parametrize("memory, aggregation, cache_scores", [
    ("linear", "grm", "context"), ("swla", "ssc", "context"), ("linear", "mean", "context"),
    ("linear", "grm", "input"), ("dla", "soup", "context"),
])
def test_layer_packed_equals_separate(memory, aggregation, cache_scores):
    from mcrnn.layers import MemoryCachingAttention

    torch.manual_seed(0)
    layer = MemoryCachingAttention(16, 2, memory=memory, aggregation=aggregation, top_k=1, segment_size=4,
                                   mini_batch=2, cache_scores=cache_scores).double()
    with torch.no_grad():  # non-trivial gates, convolution and output norm so that the check can fail
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lengths = (1, 6, 13, 8)
    x = torch.randn(1, sum(lengths), 16, dtype=torch.float64, requires_grad=True)
    cu = _cu(lengths)
    o, _, _ = layer(x, cu_seqlens=cu)
    w = torch.randn_like(o)
    params = [x, *layer.parameters()]
    g_packed = grads(o, params, w)
    outs, g_sep = [], [torch.zeros_like(p) for p in params]
    for s, e in zip(cu.tolist(), cu.tolist()[1:]):
        o_i, _, _ = layer(x[:, s:e])
        outs.append(o_i)
        for acc, g in zip(g_sep, grads(o_i, params, w[:, s:e])):
            acc += g
    assert_close(o, torch.cat(outs, dim=1), LAYER_TOL, "layer output")
    assert rel_err(layer(x)[0], o) > 1e-3  # unpacked, the sequences read each other
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, g_packed, g_sep):
        assert_close(a, b, LAYER_TOL, f"d{name}")


def test_layer_packed_rejects_cache_and_padding():
    from mcrnn.layers import MCCache, MemoryCachingAttention
    from mcrnn.models import MCConfig

    layer = MemoryCachingAttention(16, 2, segment_size=4, layer_idx=0)
    x = torch.randn(1, 10, 16)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, past_key_values=MCCache(MCConfig(hidden_size=16, num_heads=2, num_hidden_layers=1)), use_cache=True,
              cu_seqlens=cu)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, attention_mask=mask, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(2, 5, 16), cu_seqlens=torch.tensor([0, 2, 5]))


def _tiny_model(**kw):
    from mcrnn import MCConfig, MCForCausalLM

    torch.manual_seed(0)
    cfg = MCConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_heads=2, segment_size=4, mini_batch=2,
                   **kw)
    return MCForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_model_packed_equals_separate(how):
    model = _tiny_model(aggregation="grm")
    lengths = (3, 9, 1, 12)
    ids = torch.randint(0, 50, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    cu = _cu(lengths)
    packed_kw = {"cu_seqlens": cu} if how == "cu_seqlens" else {
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    out = model(ids, labels=ids, **packed_kw)
    separate = [model(ids[:, s:e]).logits for s, e in zip(cu.tolist(), cu.tolist()[1:])]
    assert_close(out.logits, torch.cat(separate, dim=1), LAYER_TOL, "logits")
    assert rel_err(model(ids).logits, out.logits) > 1e-3  # unpacked, the sequences read each other
    # the loss scores each sequence's own next tokens only: the sum of the separate sums over all targets
    sums = [model(ids[:, s:e], labels=ids[:, s:e]).loss * (e - s - 1)
            for s, e in zip(cu.tolist(), cu.tolist()[1:]) if e - s > 1]
    n_targets = sum(n - 1 for n in lengths)
    assert_close(out.loss, sum(sums) / n_targets, LAYER_TOL, "loss")
    # the gradient of a packed batch is the sum of the separate ones
    model.zero_grad()
    out.loss.backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (sum(sums) / n_targets).backward()
    for a, (name, p) in zip(g_packed, model.named_parameters()):
        assert_close(a, p.grad, LAYER_TOL, f"d{name}")


def test_model_packed_rejects_hybrids_and_cache():
    ids = torch.randint(0, 50, (1, 10))
    cu = torch.tensor([0, 4, 10])
    hybrid = _tiny_model(mixer=["mc", "attention"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        hybrid(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _tiny_model()(ids, cu_seqlens=cu, use_cache=True)


# ---- the data pipeline ---------------------------------------------------------------------------------------


def test_text_windows_carry_document_starts():
    from mcrnn.data import ByteTokenizer, TextDataset
    from mcrnn.data.packing import packed_rows

    tok = ByteTokenizer()
    plain = TextDataset("valid", tok, seq_len=64, source="sample")
    ds = TextDataset("valid", tok, seq_len=64, source="sample", separate_documents=True)
    assert plain.starts is None and torch.equal(plain.inputs, ds.inputs)  # the default is unchanged
    eos = ds.inputs == tok.eos_id
    assert eos.any(), "the sample split should hold several documents"
    assert torch.equal(ds.labels[eos], torch.full_like(ds.labels[eos], -100))
    assert torch.equal(ds.labels[~eos], plain.labels[~eos])
    assert ds.starts[:, 0].all() and torch.equal(ds.starts[:, 1:], eos[:, :-1])
    x, y, cu = packed_rows(ds.inputs[:3], ds.labels[:3], ds.starts[:3])
    assert x.shape == (1, 192) and cu[0] == 0 and cu[-1] == 192 and cu.dtype == torch.int32
    assert set(range(0, 192, 64)) <= set(cu.tolist())
    for s in cu[1:-1].tolist():  # every sequence but a window's first starts right after an eos
        assert s % 64 == 0 or x[0, s - 1] == tok.eos_id
    with pytest.raises(ValueError, match="starts"):
        packed_rows(ds.inputs[:2], ds.labels[:2], torch.zeros_like(ds.starts[:2]))
