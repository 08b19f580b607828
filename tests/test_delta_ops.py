"""DeltaNet and Gated DeltaNet: token-loop reference vs the chunk-parallel WY form, and `delta_scan`'s contract."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, make_inputs

from mcrnn.ops.delta import chunk_delta, delta_scan, naive_delta
from mcrnn.ops.gdn import chunk_gdn, naive_gdn
from mcrnn.ops.linear.chunk import linear_scan

LENGTHS = [1, 7, 63, 100, 257]
OPS = {"delta": (naive_delta, chunk_delta, ("beta",)), "gdn": (naive_gdn, chunk_gdn, ("beta", "decay"))}


def _run(op, q, k, v, gates, gate_names, **kw):
    """The layer ℓ2-normalises k (then `I − β k kᵀ` is a contraction); gradients still reach the raw leaf."""
    return op(q, F.normalize(k, dim=-1), v, *(gates[n] for n in gate_names), **kw)


def rms_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """fla's low-precision metric: RMS of the difference over RMS of the reference."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("name", list(OPS))
def test_chunk_matches_naive(name, T):
    naive, chunk, gate_names = OPS[name]
    B, H, K, V = 2, 3, 4, 5
    q, k, v, _, gates = make_inputs(B, T, H, K, V, gate_names, with_u=False)
    s0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    o1, f1 = _run(naive, q, k, v, gates, gate_names, initial_state=s0, output_final_state=True)
    o2, f2 = _run(chunk, q, k, v, gates, gate_names, initial_state=s0, output_final_state=True)
    assert o2.dtype == f2.dtype == torch.float64
    assert_close(o2, o1, 1e-11, "output")
    assert_close(f2, f1, 1e-11, "final state")
    w, wf = torch.randn_like(o1), torch.randn_like(f1)
    leaves = [q, k, v, *gates.values(), s0]
    g1 = torch.autograd.grad((o1 * w).sum() + (f1 * wf).sum(), leaves)
    g2 = torch.autograd.grad((o2 * w).sum() + (f2 * wf).sum(), leaves)
    for what, a, b in zip(["q", "k", "v", *gates, "initial_state"], g2, g1):
        assert_close(a, b, 1e-10, f"gradient of {what}")


@pytest.mark.parametrize("name", list(OPS))
def test_negative_eigenvalues(name):
    """β up to 2 (the layer's negative-eigenvalue option): `I − β k kᵀ` reflects instead of erasing."""
    naive, chunk, gate_names = OPS[name]
    q, k, v, _, gates = make_inputs(2, 100, 2, 8, 6, gate_names, grad=False, with_u=False)
    gates["beta"] = gates["beta"] * 2
    o1, f1 = _run(naive, q, k, v, gates, gate_names, output_final_state=True)
    o2, f2 = _run(chunk, q, k, v, gates, gate_names, output_final_state=True)
    assert_close(o2, o1, 1e-11, "output")
    assert_close(f2, f1, 1e-11, "final state")


def test_gdn_with_unit_decay_is_delta():
    q, k, v, _, gates = make_inputs(2, 70, 2, 4, 3, ("beta",), grad=False, with_u=False)
    ones = torch.ones_like(gates["beta"])
    k = F.normalize(k, dim=-1)
    for gdn, delta in ((naive_gdn, naive_delta), (chunk_gdn, chunk_delta)):
        o1, f1 = gdn(q, k, v, gates["beta"], ones, output_final_state=True)
        o2, f2 = delta(q, k, v, gates["beta"], output_final_state=True)
        assert_close(o1, o2, 1e-12, gdn.__name__)
        assert_close(f1, f2, 1e-12, gdn.__name__)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("split", [1, 50, 64, 99])
def test_chaining(name, split):
    _, chunk, gate_names = OPS[name]
    q, k, v, _, gates = make_inputs(1, 100, 2, 4, 3, gate_names, grad=False, with_u=False)
    o, f = _run(chunk, q, k, v, gates, gate_names, output_final_state=True)
    head = {n: g[:, :split] for n, g in gates.items()}
    tail = {n: g[:, split:] for n, g in gates.items()}
    oa, fa = _run(chunk, q[:, :split], k[:, :split], v[:, :split], head, gate_names, output_final_state=True)
    ob, fb = _run(chunk, q[:, split:], k[:, split:], v[:, split:], tail, gate_names, initial_state=fa,
                  output_final_state=True)
    assert_close(torch.cat([oa, ob], 1), o, 1e-12, "chained output")
    assert_close(fb, f, 1e-12, "chained state")


def test_zero_decay_restarts_the_state():
    q, k, v, _, gates = make_inputs(1, 80, 2, 4, 4, ("beta",), grad=False, with_u=False)
    k = F.normalize(k, dim=-1)
    beta = gates["beta"]
    decay = torch.ones(1, 80, 2, dtype=torch.float64)
    decay[:, 40] = 0.0
    o, _ = chunk_gdn(q, k, v, beta, decay)
    o_tail, _ = chunk_delta(q[:, 40:], k[:, 40:], v[:, 40:], beta[:, 40:])
    assert_close(o[:, 40:], o_tail, 1e-12)
    o_ref, _ = naive_gdn(q, k, v, beta, decay)
    assert_close(o, o_ref, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(OPS))
def test_low_precision_inputs(name, dtype):
    naive, chunk, gate_names = OPS[name]
    q, k, v, _, gates = make_inputs(2, 257, 2, 32, 16, gate_names, with_u=False)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, *gates.values())]
    ref = [x.detach().double().requires_grad_() for x in low]  # the same rounded inputs, computed exactly
    o, f = _run(chunk, *low[:3], dict(zip(gate_names, low[3:])), gate_names, output_final_state=True)
    o_ref, f_ref = _run(naive, *ref[:3], dict(zip(gate_names, ref[3:])), gate_names, output_final_state=True)
    assert o.dtype == dtype and f.dtype == torch.float32
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    assert rms_ratio(o, o_ref) <= tol
    assert rms_ratio(f, f_ref) <= tol
    w = torch.randn_like(o_ref)
    g = torch.autograd.grad((o * w.to(dtype)).sum(), low)
    g_ref = torch.autograd.grad((o_ref * w).sum(), ref)
    for what, a, b in zip(["q", "k", "v", *gate_names], g, g_ref):
        assert a.dtype == dtype
        assert rms_ratio(a, b) <= 2 * tol, f"gradient of {what}: {rms_ratio(a, b):.3e}"


def test_default_scale():
    q, k, v, _, gates = make_inputs(1, 9, 1, 16, 4, ("beta",), grad=False, with_u=False)
    k = F.normalize(k, dim=-1)
    o1, _ = chunk_delta(q, k, v, gates["beta"])
    o2, _ = chunk_delta(q, k, v, gates["beta"], scale=0.25)  # 16 ** -0.5
    o3, _ = naive_delta(q, k, v, gates["beta"], scale=1.0)
    assert_close(o1, o2, 1e-14)
    assert_close(o3 * 0.25, o1, 1e-13)


# --- delta_scan: the heads-first contract of linear_scan (resets, snapshots) that Memory Caching calls ---


def _token_loop(update, q, k, v, gates, resets, s0, positions):
    """One token at a time: the state restarts from zero before every reset, snapshots after token `e − 1`."""
    B, H, T, K = k.shape
    S = s0 if s0 is not None else k.new_zeros(B, H, K, v.shape[-1])
    outs, snaps = [], {}
    for t in range(T):
        if t in resets:
            S = torch.zeros_like(S)
        S = update(S, k[:, :, t], v[:, :, t], {n: g[:, :, t, None, None] for n, g in gates.items()})
        if q is not None:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
        snaps[t + 1] = S
    o = torch.stack(outs, 2) if q is not None else None
    return o, (torch.stack([snaps[e] for e in positions], 2) if positions else None), S


def _delta_update(S, k, v, g):
    kkT = k.unsqueeze(-1) * k.unsqueeze(-2)
    erased = S - g["beta"] * (kkT @ S)
    return (g["decay"] * erased if "decay" in g else erased) + g["beta"] * k.unsqueeze(-1) * v.unsqueeze(-2)


def _linear_update(S, k, v, g):
    return (g["decay"] * S if "decay" in g else S) + k.unsqueeze(-1) * v.unsqueeze(-2)


SCAN_CASES = {  # (T, chunk_size, resets, positions)
    "none": (100, 64, [], [100]),
    "mid-chunk": (150, 64, [30, 64, 100, 101], [1, 30, 31, 64, 99, 101, 128, 150]),
    "reset-at-0": (70, 16, [0, 16, 40], [16, 17, 40, 70]),
    "short": (5, 64, [3], [2, 3, 4, 5]),
}


@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("with_decay", [True, False])
@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_delta_scan_resets_and_snapshots(case, with_decay, with_q):
    T, chunk_size, resets, positions = SCAN_CASES[case]
    B, H, K, V = 2, 2, 4, 3
    q, k, v, _, gates = make_inputs(B, T, H, K, V, ("beta", "decay") if with_decay else ("beta",), with_u=False)
    s0 = torch.randn(B, H, K, V, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def heads_first():  # a fresh graph per call, so each side can be differentiated on its own
        hf = lambda x: x.transpose(1, 2)
        gh = {n: hf(g) for n, g in gates.items()}
        return hf(q) * K**-0.5 if with_q else None, F.normalize(hf(k), dim=-1), hf(v), gh

    o1, p1, f1 = _token_loop(_delta_update, *heads_first(), resets, s0, positions)
    qh, kh, vh, gh = heads_first()
    log_a = torch.log(gh["decay"]) if with_decay else None
    o2, p2, f2 = delta_scan(qh, kh, vh, gh["beta"], log_a, resets=resets, initial_state=s0, positions=positions,
                            chunk_size=chunk_size)
    assert_close(f2, f1, 1e-11, "final state")
    assert_close(p2, p1, 1e-11, "snapshots")
    outs = [(f1, f2), (p1, p2)]
    if with_q:
        assert_close(o2, o1, 1e-11, "output")
        outs.append((o1, o2))
    else:
        assert o2 is None
    weights = [torch.randn_like(a) for a, _ in outs]
    loss1 = sum((a * w).sum() for (a, _), w in zip(outs, weights))
    loss2 = sum((b * w).sum() for (_, b), w in zip(outs, weights))
    leaves = [k, v, *gates.values(), s0] + ([q] if with_q else [])
    grad = lambda loss: torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    for a, b in zip(grad(loss2), grad(loss1)):  # with a reset at 0, s0's gradient is zero on both sides
        assert_close(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_token_loop_mirrors_linear_scan(case):
    """The loop above is the reset/snapshot semantics of linear_scan, so delta_scan matches linear_scan's contract."""
    T, chunk_size, resets, positions = SCAN_CASES[case]
    q, k, v, _, gates = make_inputs(1, T, 2, 4, 3, ("decay",), grad=False, with_u=False)
    hf = lambda x: x.transpose(1, 2)
    s0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    gh = {n: hf(g) for n, g in gates.items()}
    o1, p1, f1 = _token_loop(_linear_update, hf(q), hf(k), hf(v), gh, resets, s0, positions)
    o2, p2, f2 = linear_scan(hf(q), hf(k), hf(v), torch.log(gh["decay"]), resets=resets, initial_state=s0,
                             positions=positions, chunk_size=chunk_size)
    for a, b in ((o2, o1), (p2, p1), (f2, f1)):
        assert_close(a, b, 1e-11)


def test_delta_scan_without_outputs_or_snapshots():
    _, k, v, _, gates = make_inputs(1, 40, 2, 4, 3, ("beta",), grad=False, with_u=False)
    hf = lambda x: x.transpose(1, 2)
    o, snaps, final = delta_scan(None, F.normalize(hf(k), dim=-1), hf(v), hf(gates["beta"]))
    _, ref = naive_delta(k, F.normalize(k, dim=-1), v, gates["beta"], output_final_state=True)
    assert o is None and snaps is None
    assert_close(final, ref, 1e-12)


BAD_INPUTS = [
    (dict(q=torch.randn(2, 5, 3)), "`q` must have shape"),
    (dict(k=torch.randn(2, 6, 3, 4)), "`k` must have the shape"),
    (dict(v=torch.randn(2, 5, 2, 4)), "`v` must have shape"),
    (dict(beta=None), "gate `beta` is required"),
    (dict(beta=torch.rand(2, 5, 2)), "gate `beta` must have shape"),
    (dict(beta=torch.full((2, 5, 3), 2.5)), r"gate `beta` must lie in \[0.0, 2.0\]"),
    (dict(beta=torch.full((2, 5, 3), -0.1)), "gate `beta` must lie in"),
    (dict(beta=torch.full((2, 5, 3), float("nan"))), "gate `beta` contains NaN"),
    (dict(decay=None), "gate `decay` is required"),
    (dict(decay=torch.full((2, 5, 3), 1.5)), r"gate `decay` must lie in \[0.0, 1.0\]"),
    (dict(decay=torch.rand(2, 5, 1)), "gate `decay` must have shape"),
    (dict(initial_state=torch.randn(2, 3, 4)), "`initial_state` must be a tensor of shape"),
    (dict(q=torch.randn(2, 5, 3, 4, dtype=torch.float64)), "one dtype"),
    (dict(scale=float("inf")), "`scale`"),
]


@pytest.mark.parametrize(
    "name, kwargs, match",
    [(name, kw, m) for name in OPS for kw, m in BAD_INPUTS if name == "gdn" or "decay" not in kw],
)
def test_bad_input_names_the_argument(name, kwargs, match):
    args = dict(q=torch.randn(2, 5, 3, 4), k=torch.randn(2, 5, 3, 4), v=torch.randn(2, 5, 3, 4),
                beta=torch.rand(2, 5, 3), decay=torch.rand(2, 5, 3))
    args.update(kwargs)
    naive, chunk, gate_names = OPS[name]
    positional = [args.pop(n) for n in ("q", "k", "v", *gate_names)]
    args.pop("decay", None)
    for op in (naive, chunk):
        with pytest.raises(ValueError, match=match):
            op(*positional, **args)


def test_matches_fla_naive_if_installed():
    fla_delta = pytest.importorskip("fla.ops.delta_rule.naive")
    fla_gdn = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, v, _, gates = make_inputs(2, 33, 2, 8, 6, ("beta", "decay"), grad=False, with_u=False)
    q, k, v, beta, decay = (x.float() for x in (q, F.normalize(k, dim=-1), v, gates["beta"], gates["decay"]))
    s0 = torch.randn(2, 2, 8, 6)
    ours, ours_f = naive_gdn(q, k, v, beta, decay, initial_state=s0, output_final_state=True)
    theirs, theirs_f = fla_gdn.naive_recurrent_gated_delta_rule(
        q, k, v, beta=beta, g=torch.log(decay), scale=8**-0.5, initial_state=s0, output_final_state=True
    )
    assert_close(ours, theirs, 1e-4, "gdn output")
    assert_close(ours_f, theirs_f, 1e-4, "gdn final state")
    # fla's delta-rule reference is heads-first with the default scale K ** -0.5
    hf = lambda x: x.transpose(1, 2).contiguous()
    ours, ours_f = naive_delta(q, k, v, beta, initial_state=s0, output_final_state=True)
    theirs, theirs_f = fla_delta.delta_rule_recurrence(hf(q), hf(k), hf(v), hf(beta), initial_state=s0,
                                                       output_final_state=True)
    assert_close(ours, hf(theirs), 1e-4, "delta output")
    assert_close(ours_f, theirs_f, 1e-4, "delta final state")
