"""The base memories: token-loop reference vs chunk-parallel path (outputs, final states, gradients)."""

import pytest
import torch
from helpers import assert_close, make_inputs

from mcrnn.ops import chunk_linear, chunk_swla, naive_linear, naive_swla

LENGTHS = [1, 7, 63, 100, 257]
OPS = {
    "linear": (naive_linear, chunk_linear, ("decay",)),
    "swla": (naive_swla, chunk_swla, ("decay", "prev", "cur")),
}


def _initial(name, B, H, K, V, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    S = torch.randn(B, H, K, V, generator=g, dtype=dtype).requires_grad_()
    if name == "linear":
        return S, [S]
    kv = {"k": torch.randn(B, H, K, generator=g, dtype=dtype).requires_grad_(),
          "v": torch.randn(B, H, V, generator=g, dtype=dtype).requires_grad_()}
    return {"S": S, **kv}, [S, kv["k"], kv["v"]]


def _flat(state):
    return [state] if isinstance(state, torch.Tensor) else [state[n] for n in sorted(state)]


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("with_gates", [True, False])
def test_chunk_matches_naive(name, T, with_gates):
    naive, chunk, gate_names = OPS[name]
    B, H, K, V = 2, 3, 4, 5
    q, k, v, _, gates = make_inputs(B, T, H, K, V, gate_names if with_gates else (), with_u=False)
    s0, s0_leaves = _initial(name, B, H, K, V)
    o1, f1 = naive(q, k, v, **gates, initial_state=s0, output_final_state=True)
    o2, f2 = chunk(q, k, v, **gates, initial_state=s0, output_final_state=True)
    assert_close(o2, o1, 1e-11, "output")
    for a, b in zip(_flat(f2), _flat(f1)):
        assert_close(a, b, 1e-11, "final state")
    w = torch.randn_like(o1)
    wf = [torch.randn_like(x) for x in _flat(f1)]
    leaves = [q, k, v, *gates.values(), *s0_leaves]
    loss1 = (o1 * w).sum() + sum((x * y).sum() for x, y in zip(_flat(f1), wf))
    loss2 = (o2 * w).sum() + sum((x * y).sum() for x, y in zip(_flat(f2), wf))
    g1 = torch.autograd.grad(loss1, leaves)
    g2 = torch.autograd.grad(loss2, leaves)
    for a, b in zip(g2, g1):
        assert_close(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("split", [1, 50, 64, 99])
def test_chaining(name, split):
    _, chunk, gate_names = OPS[name]
    q, k, v, _, gates = make_inputs(1, 100, 2, 4, 3, gate_names, grad=False, with_u=False)
    o, f = chunk(q, k, v, **gates, output_final_state=True)
    cut = lambda x, a, b: x[:, a:b]
    oa, fa = chunk(*(cut(x, 0, split) for x in (q, k, v)), **{n: cut(g, 0, split) for n, g in gates.items()},
                   output_final_state=True)
    ob, fb = chunk(*(cut(x, split, None) for x in (q, k, v)), **{n: cut(g, split, None) for n, g in gates.items()},
                   initial_state=fa, output_final_state=True)
    assert_close(torch.cat([oa, ob], 1), o, 1e-12, "chained output")
    for a, b in zip(_flat(fb), _flat(f)):
        assert_close(a, b, 1e-12, "chained state")


def test_swla_with_zero_prev_is_decayed_linear():
    q, k, v, _, gates = make_inputs(2, 70, 2, 4, 4, ("decay",), grad=False, with_u=False)
    o1, _ = chunk_swla(q, k, v, decay=gates["decay"], prev=torch.zeros_like(gates["decay"]))
    o2, _ = chunk_linear(q, k, v, decay=gates["decay"])
    assert_close(o1, o2, 1e-12)


def test_zero_decay_restarts_the_state():
    q, k, v, _, _ = make_inputs(1, 80, 2, 4, 4, grad=False, with_u=False)
    decay = torch.ones(1, 80, 2, dtype=torch.float64)
    decay[:, 40] = 0.0
    o, _ = chunk_linear(q, k, v, decay=decay)
    o_tail, _ = chunk_linear(q[:, 40:], k[:, 40:], v[:, 40:])
    assert_close(o[:, 40:], o_tail, 1e-12)
    o_ref, _ = naive_linear(q, k, v, decay=decay)
    assert_close(o, o_ref, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(OPS))
def test_low_precision_inputs(name, dtype):
    naive, chunk, gate_names = OPS[name]
    q, k, v, _, gates = make_inputs(2, 100, 2, 16, 16, gate_names, grad=False, with_u=False)
    o_ref, _ = naive(q, k, v, **gates)
    cast = lambda x: x.to(dtype)
    o, f = chunk(cast(q), cast(k), cast(v), **{n: cast(g) for n, g in gates.items()}, output_final_state=True)
    assert o.dtype == dtype
    assert all(x.dtype == torch.float32 for x in _flat(f))
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}[dtype]
    assert_close(o, o_ref, tol)


def test_default_scale_and_explicit_scale():
    q, k, v, _, _ = make_inputs(1, 9, 1, 16, 4, grad=False, with_u=False)
    o1, _ = chunk_linear(q, k, v)
    o2, _ = chunk_linear(q, k, v, scale=0.25)
    assert_close(o1, o2, 1e-14)  # 16 ** -0.5 == 0.25
    o3, _ = chunk_linear(q, k, v, scale=1.0)
    assert_close(o3 * 0.25, o1, 1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.randn(2, 5, 3)), "`q` must have shape"),
        (dict(k=torch.randn(2, 6, 3, 4)), "`k` must have the shape"),
        (dict(v=torch.randn(2, 5, 2, 4)), "`v` must have shape"),
        (dict(decay=torch.rand(2, 5, 2)), "gate `decay` must have shape"),
        (dict(decay=torch.full((2, 5, 3), 1.5)), "gate `decay` must lie in"),
        (dict(decay=torch.full((2, 5, 3), float("nan"))), "NaN"),
        (dict(initial_state=torch.randn(2, 3, 4)), "`initial_state` must be a tensor of shape"),
        (dict(q=torch.randn(2, 5, 3, 4, dtype=torch.float64)), "one dtype"),
        (dict(q=torch.randint(0, 3, (2, 5, 3, 4))), "must be float"),
        (dict(scale=float("nan")), "`scale`"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(q=torch.randn(2, 5, 3, 4), k=torch.randn(2, 5, 3, 4), v=torch.randn(2, 5, 3, 4))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        chunk_linear(q, k, v, **args)
    with pytest.raises(ValueError, match=match):
        naive_linear(q, k, v, **args)


def test_swla_bad_state():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="keys 'S', 'k', 'v'"):
        chunk_swla(q, q, q, initial_state={"S": torch.zeros(1, 2, 4, 4)})


def test_matches_fla_naive_if_installed():
    fla_naive = pytest.importorskip("fla.ops.linear_attn.naive")
    q, k, v, _, _ = make_inputs(2, 33, 2, 8, 8, grad=False, with_u=False)
    ours, _ = naive_linear(q.float(), k.float(), v.float())
    fn = getattr(fla_naive, "naive_chunk_linear_attn", None) or fla_naive.naive_recurrent_linear_attn
    theirs = fn(q.float(), k.float(), v.float(), scale=8**-0.5)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert_close(ours, theirs, 1e-4)
