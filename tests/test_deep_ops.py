"""Deep memories (dla, titans): the mini-batch-parallel scan against the token loop, against an
autograd-written online rule, against linear attention, chaining, the Memory interface, validation and
low precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mcrnn.ops.deep.scan as deep_scan_module
from mcrnn.ops import get_memory
from mcrnn.ops.dla import chunk_dla, naive_dla
from mcrnn.ops.dla.memory import DLAMemory
from mcrnn.ops.linear import chunk_linear
from mcrnn.ops.titans import chunk_titans, naive_titans
from mcrnn.ops.titans.memory import MOMENTUM, TitansMemory

OPS = {"dla": (naive_dla, chunk_dla), "titans": (naive_titans, chunk_titans)}
GATES = {"dla": ("lr", "decay"), "titans": ("lr", "momentum", "forget")}
B, H, K, E = 2, 3, 8, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second OpenMP thread only adds wake-up latency (tens of ms per op when the
    cores are shared), so the module runs single-threaded and restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def state_keys(kind, params):
    return get_memory(kind).state_keys(params)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make(kind, depth, T, *, dtype=torch.float64, seed=0, init=True):
    """Inputs in the fla layout, all leaves requiring grad; `init` adds a random initial state."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).requires_grad_()

    def u(lo, hi):
        x = lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=torch.float64)
        return x.to(dtype).requires_grad_()

    x = {"q": r(B, T, H, K, s=0.5), "k": r(B, T, H, K, s=0.5), "v": r(B, T, H, K, s=0.5)}
    params = {"W1": r(H, K, E, s=0.3), "W2": r(H, E, K, s=0.3)} if depth == 2 else {"W": r(H, K, K, s=0.3)}
    # ranges where the online regression stays bounded over 100 tokens (titans' momentum amplifies θ)
    if kind == "dla":
        gates = {"lr": u(0.05, 0.6), "decay": u(0.7, 1.0)}
    else:
        gates = {"lr": u(0.02, 0.12), "momentum": u(0.2, 0.8), "forget": u(0.0, 0.2)}
    state = None
    if init:
        state = {}
        for n in state_keys(kind, params):
            base = n[:-3] if n.endswith("_mb") else {m: w for w, m in MOMENTUM.items()}.get(n, n)
            state[n] = r(B, *params[base].shape, s=0.3)
    return x, params, gates, state


def leaves(x, params, gates, state):
    out = [*x.values(), *params.values(), *gates.values()]
    return out + (list(state.values()) if state is not None else [])


def run(fn, x, params, gates, state, mb, offset=0, grad=True, seed=1):
    """Outputs, final state and the gradients of a random linear function of both w.r.t. every leaf."""
    o, st = fn(x["q"], x["k"], x["v"], params, **gates, mini_batch=mb, initial_state=state,
               output_final_state=True, offset=offset)
    if not grad:
        return o, st, None
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
    for n in sorted(st):
        loss = loss + (st[n] * torch.randn(st[n].shape, generator=g, dtype=st[n].dtype)).sum()
    ls = leaves(x, params, gates, state)
    return o, st, torch.autograd.grad(loss, ls, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("kind", ["dla", "titans"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("mb", [1, 4, 16])
@pytest.mark.parametrize("T", [1, 7, 37, 100])
def test_chunk_matches_naive(kind, depth, mb, T):
    naive, chunk = OPS[kind]
    inp = make(kind, depth, T, init=T != 7)  # T = 7 runs from M_0 = params
    o1, s1, g1 = run(naive, *inp, mb)
    o2, s2, g2 = run(chunk, *inp, mb)
    assert o2.dtype == torch.float64 and set(s1) == set(s2) == set(state_keys(kind, inp[1]))
    assert rel(o2, o1) < 1e-10
    for n in s1:
        assert rel(s2[n], s1[n]) < 1e-10, n
    for a, b in zip(g2, g1, strict=True):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("kind", ["dla", "titans"])
def test_zero_and_one_gates(kind):
    """Gates of exactly 0 and 1 (no log-space floor may leak in): values and gradients still match."""
    naive, chunk = OPS[kind]
    x, params, gates, state = make(kind, 2, 23)
    with torch.no_grad():
        for gt in gates.values():
            gt[:, ::5] = 0.0
            gt[:, 2::7] = 1.0
    o1, s1, g1 = run(naive, x, params, gates, state, 4)
    o2, s2, g2 = run(chunk, x, params, gates, state, 4)
    assert rel(o2, o1) < 1e-10
    for a, b in zip(g2, g1, strict=True):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-10


def _mlp(W, x):
    if "W" in W:
        return torch.einsum("bhvk,bhk->bhv", W["W"], x)
    h = torch.einsum("bhek,bhk->bhe", W["W2"], x)
    return x + torch.einsum("bhve,bhe->bhv", W["W1"], F.gelu(h))


def online_rule_autograd(kind, x, params, gates, mb):
    """SPEC §1 written independently of mcrnn: each gradient by `torch.autograd.grad` of the loss at the
    weights of the mini-batch's start, the updates token by token."""
    T = x["q"].shape[1]
    W = {n: p.detach().unsqueeze(0).expand(B, *p.shape).clone() for n, p in params.items()}
    S = {n: torch.zeros_like(w) for n, w in W.items()}
    g = {n: t.detach() for n, t in gates.items()}
    outs = []
    for t in range(T):
        if t % mb == 0:
            W_mb = {n: w.detach().clone().requires_grad_() for n, w in W.items()}
        k, v = x["k"][:, t].detach(), x["v"][:, t].detach()
        y = _mlp(W_mb, k)
        loss = -(y * v).sum() if kind == "dla" else 0.5 * ((y - v) ** 2).sum()
        grads = dict(zip(W_mb, torch.autograd.grad(loss, list(W_mb.values())), strict=True))
        for n in W:
            lr = g["lr"][:, t, :, None, None]
            if kind == "dla":
                W[n] = g["decay"][:, t, :, None, None] * W[n] - lr * grads[n]
            else:
                S[n] = g["momentum"][:, t, :, None, None] * S[n] - lr * grads[n]
                W[n] = (1 - g["forget"][:, t, :, None, None]) * W[n] + S[n]
        outs.append(_mlp(W, x["q"][:, t].detach()))
    return torch.stack(outs, dim=1), W


@pytest.mark.parametrize("kind", ["dla", "titans"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("mb", [1, 5])
def test_matches_autograd_online_rule(kind, depth, mb):
    x, params, gates, _ = make(kind, depth, 19, init=False)
    o_ref, W_ref = online_rule_autograd(kind, x, params, gates, mb)
    o, st = OPS[kind][1](x["q"], x["k"], x["v"], params, **gates, mini_batch=mb, output_final_state=True)
    assert rel(o, o_ref) < 1e-10
    for n in W_ref:
        assert rel(st[n], W_ref[n]) < 1e-10


@pytest.mark.parametrize("mb", [1, 16])
def test_dla_depth1_is_linear_attention(mb):
    x, params, gates, _ = make("dla", 1, 45, init=False)
    o, st = chunk_dla(x["q"], x["k"], x["v"], params, lr=torch.ones_like(gates["lr"]), decay=gates["decay"],
                      mini_batch=mb, output_final_state=True)
    s0 = params["W"].transpose(-1, -2).unsqueeze(0).expand(B, H, K, K)  # S = Wᵀ
    o_lin, s_lin = chunk_linear(x["q"], x["k"], x["v"], decay=gates["decay"], scale=1.0, initial_state=s0,
                                output_final_state=True)
    assert rel(o, o_lin) < 1e-10
    assert rel(st["W"].transpose(-1, -2), s_lin) < 1e-10
    # lr = None means θ = 1
    o_none, _ = chunk_dla(x["q"], x["k"], x["v"], params, lr=None, decay=gates["decay"], mini_batch=mb)
    assert rel(o_none, o_lin) < 1e-10


@pytest.mark.parametrize("kind", ["dla", "titans"])
@pytest.mark.parametrize("mb,t1", [(4, 8), (4, 9), (4, 3), (16, 16), (16, 21), (16, 1), (1, 5)])
def test_chaining(kind, mb, t1):
    """`x[:t1]` then `x[t1:]` (with `offset = t1 % mb`) equals one call, on and off mini-batch boundaries."""
    naive, chunk = OPS[kind]
    x, params, gates, state = make(kind, 2, 37)

    def part(sl):
        return {n: t[:, sl] for n, t in x.items()}, {n: t[:, sl] for n, t in gates.items()}

    with torch.no_grad():
        o_full, s_full = chunk(x["q"], x["k"], x["v"], params, **gates, mini_batch=mb, initial_state=state,
                               output_final_state=True)
        for fn in (chunk, naive):
            xa, ga = part(slice(0, t1))
            xb, gb = part(slice(t1, None))
            oa, sa = fn(xa["q"], xa["k"], xa["v"], params, **ga, mini_batch=mb, initial_state=state,
                        output_final_state=True)
            ob, sb = fn(xb["q"], xb["k"], xb["v"], params, **gb, mini_batch=mb, initial_state=sa,
                        output_final_state=True, offset=t1 % mb)
            assert rel(torch.cat([oa, ob], dim=1), o_full) < 1e-10
            for n in s_full:
                assert rel(sb[n], s_full[n]) < 1e-10, n


# ---------------------------------------------------------------------------------------------------------
# the Memory interface
# ---------------------------------------------------------------------------------------------------------


def heads_first(x, params, gates):
    return (
        {n: t.transpose(1, 2) for n, t in x.items()},
        {n: t.transpose(1, 2) for n, t in gates.items()},
    )


def step_loop(mem, q, k, v, gates, *, initial, params, mb, segment_starts, resets, positions, offset, scale):
    """The contract of `Memory.scan`, written with `Memory.step` / `Memory.read`."""
    T = k.shape[2]
    state, seg_pos, outs, snaps = initial, offset, [], []
    m0 = mem.init_state(B, H, K, K, k, params)
    for t in range(T):
        if t in segment_starts:
            seg_pos = 0
        if t in resets:
            state = m0
        g = {n: x[:, :, t] for n, x in gates.items()}
        state = mem.step(state, k[:, :, t], v[:, :, t], g, seg_pos=seg_pos, params=params, mini_batch=mb)
        outs.append(mem.read(mem.readable(state), q[:, :, t], scale))
        if t + 1 in positions:
            snaps.append(mem.readable(state))
        seg_pos += 1
    snap = {n: torch.stack([s[n] for s in snaps], dim=2) for n in snaps[0]} if snaps else None
    return torch.stack(outs, dim=2), snap, state


@pytest.mark.parametrize("kind", ["dla", "titans"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize(
    "segment_starts,resets,positions,offset",
    [
        ([0, 6, 13, 22], [13], [1, 6, 10, 13, 29], 0),
        ([5, 13, 17], [5, 17], [3, 5, 16, 17, 28], 3),  # continues a segment 3 tokens in
        ([], [], [29], 6),
        ([0, 8, 16, 24], [0, 8, 16, 24], [], 0),  # independent segments of 2 mini-batches
    ],
)
def test_memory_scan_matches_step_loop(kind, depth, segment_starts, resets, positions, offset):
    mem = get_memory(kind)
    assert isinstance(mem, DLAMemory if kind == "dla" else TitansMemory)
    assert mem.deep and not mem.linear_read and mem.default_scale(K) == 1.0
    mb, T, scale = 4, 29, 0.7
    x, params, gates, state = make(kind, depth, T)
    mem.check(K, K, params, mb, H)
    xh, gh = heads_first(x, params, gates)
    kw = dict(initial=state, params=params, segment_starts=segment_starts, resets=resets, positions=positions,
              offset=offset, scale=scale)
    o1, snap1, fin1 = step_loop(mem, xh["q"], xh["k"], xh["v"], gh, mb=mb, **kw)
    o2, snap2, fin2 = mem.scan(xh["q"], xh["k"], xh["v"], gh, mini_batch=mb, **kw)
    assert rel(o2, o1) < 1e-10
    assert set(fin2) == set(fin1)
    for n in fin1:
        assert rel(fin2[n], fin1[n]) < 1e-10, n
    if positions:
        assert set(snap2) == set(mem.readable(state))
        for n in snap1:
            assert snap2[n].shape == (B, H, len(positions), *state[n].shape[2:])
            assert rel(snap2[n], snap1[n]) < 1e-10, n
    else:
        assert snap2 is None
    # gradients through the scan equal those through the step loop
    w = torch.randn(o1.shape, dtype=o1.dtype)
    ls = leaves(x, params, gates, state)
    g1 = torch.autograd.grad((o1 * w).sum() + sum(s.sum() for s in fin1.values()), ls, allow_unused=True)
    g2 = torch.autograd.grad((o2 * w).sum() + sum(s.sum() for s in fin2.values()), ls, allow_unused=True)
    for a, b in zip(g2, g1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(a, b) < 1e-10
    # no q: only states
    o3, _, fin3 = mem.scan(None, xh["k"], xh["v"], gh, mini_batch=mb, **kw)
    assert o3 is None and all(rel(fin3[n], fin1[n]) < 1e-10 for n in fin1)


@pytest.mark.parametrize("kind", ["dla", "titans"])
def test_recomputed_states(monkeypatch, kind):
    """Past a memory budget the scan keeps every ~sqrt(n)-th entering state and recomputes the others in the
    backward (resets and snapshots inside the recomputed segments included): same values and gradients."""
    monkeypatch.setattr(deep_scan_module, "_KEEP_ALL_BYTES", 0)
    test_chunk_matches_naive(kind, 2, 4, 100)
    test_memory_scan_matches_step_loop(kind, 2, [0, 6, 13, 22], [13], [1, 6, 10, 13, 29], 0)
    test_memory_scan_matches_step_loop(kind, 1, [5, 13, 17], [5, 17], [3, 5, 16, 17, 28], 3)


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_batched_reads(depth):
    mem = get_memory("titans")
    _, params, _, _ = make("titans", depth, 1)
    N, t, scale = 5, 6, 0.8
    g = torch.Generator().manual_seed(3)
    cache = {n: torch.randn(B, H, N, *p.shape[1:], generator=g, dtype=torch.float64) * 0.3
             for n, p in params.items()}
    q = torch.randn(B, H, t, K, generator=g, dtype=torch.float64)
    dense = mem.read_dense(cache, q, scale)
    assert dense.shape == (B, H, t, N, K)
    for i in range(N):
        ref = torch.stack([mem.read({n: c[:, :, i] for n, c in cache.items()}, q[:, :, j], scale)
                           for j in range(t)], dim=2)
        assert rel(dense[:, :, :, i], ref) < 1e-12
    states = {n: c.reshape(B * H * N, *c.shape[3:]) for n, c in cache.items()}
    qg = torch.randn(B * H * N, t, K, generator=g, dtype=torch.float64)
    grp = mem.read_groups(states, qg, scale)
    ref = torch.stack([mem.read(states, qg[:, j], scale) for j in range(t)], dim=1)
    assert rel(grp, ref) < 1e-12


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_weighted_read(depth):
    """GRM's weighted read of many cached deep memories (stacked GEMMs, hidden activations recomputed in the
    backward) against the sum of single reads: values and gradients."""
    mem = get_memory("titans")
    _, params, _, _ = make("titans", depth, 1)
    N, t, scale = 5, 7, 0.8
    g = torch.Generator().manual_seed(4)
    cache = {n: (torch.randn(B, H, N, *p.shape[1:], generator=g, dtype=torch.float64) * 0.3).requires_grad_()
             for n, p in params.items()}
    q = torch.randn(B, H, t, K, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(B, H, t, N, generator=g, dtype=torch.float64, requires_grad=True)
    out = mem.read_weighted(cache, w, q, scale)
    ref = sum(w[..., i, None] * torch.stack([mem.read({n: c[:, :, i] for n, c in cache.items()}, q[:, :, j], scale)
                                               for j in range(t)], dim=2) for i in range(N))
    assert out.shape == (B, H, t, K) and rel(out, ref) < 1e-12
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    leaves_ = [q, w, *cache.values()]
    for a, b in zip(torch.autograd.grad(out, leaves_, dy), torch.autograd.grad(ref, leaves_, dy), strict=True):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["dla", "titans"])
def test_gradients_of_any_scale(kind):
    """The backward normalises its incoming gradients before flushing tiny entries: a loss scaled by 2^-80 (float32
    gradients far below the flush threshold 1.1e-19) gets exactly 2^-80 times the gradients."""
    x, params, gates, state = make(kind, 2, 37, dtype=torch.float32)
    ls = leaves(x, params, gates, state)
    o, st = OPS[kind][1](x["q"], x["k"], x["v"], params, **gates, mini_batch=4, initial_state=state,
                         output_final_state=True)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    loss = (o * w).sum() + st["W1"].sum()
    g1 = torch.autograd.grad(loss, ls, retain_graph=True, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad(loss * 2.0**-80, ls, allow_unused=True, materialize_grads=True)
    assert all(a.abs().max() > 0 for a in g1[:3])
    for a, b in zip(g2, g1, strict=True):
        assert torch.equal(a * 2.0**80, b)


@pytest.mark.parametrize("kind", ["dla", "titans"])
def test_forgetting_memory_has_no_subnormals(kind):
    """A memory that forgets decays towards zero; the scan zeroes state entries below sqrt(tiny) (float32: 1.1e-19)
    instead of computing with subnormal floats (50-100x slower on x86). Outputs still match the token loop."""
    x, params, gates, _ = make(kind, 2, 64, dtype=torch.float32, init=False)
    with torch.no_grad():
        gates["lr"][:, 8:] = 0.0  # no new writes after token 8: the state decays by 0.2^56 ~ 1e-39 (subnormal)
        if kind == "dla":
            gates["decay"].fill_(0.2)
        else:
            gates["forget"].fill_(0.8)
            gates["momentum"].fill_(0.05)
    o, st = OPS[kind][1](x["q"], x["k"], x["v"], params, **gates, mini_batch=4, output_final_state=True)
    o_ref, st_ref = OPS[kind][0](x["q"], x["k"], x["v"], params, **gates, mini_batch=4, output_final_state=True)
    assert rel(o, o_ref) < 1e-5
    tiny = torch.finfo(torch.float32).tiny
    for n in st:
        assert not ((st[n] != 0) & (st[n].abs() < tiny)).any(), n
        assert (st[n] - st_ref[n]).abs().max() < 1e-18, n  # the decayed state is ~0 in both


def test_memories_registered_and_check():
    for kind in ("dla", "titans"):
        mem = get_memory(kind)
        assert mem.gate_names == GATES[kind]
        _, params, _, _ = make(kind, 2, 1)
        with pytest.raises(ValueError, match="mini_batch"):
            mem.check(K, K, params, None, H)
        with pytest.raises(ValueError, match="mini_batch"):
            mem.check(K, K, params, 0, H)
        with pytest.raises(ValueError, match="params"):
            mem.check(K, K, None, 4, H)
        with pytest.raises(ValueError, match="params"):
            mem.check(K, K, params, 4, H + 1)
        with pytest.raises(ValueError, match="K == V"):
            mem.check(K, K + 1, params, 4, H)
        st = mem.init_state(B, H, K, K, torch.zeros(1, dtype=torch.float32), params)
        assert set(st) == set(state_keys(kind, params)) and all(s.dtype == torch.float32 for s in st.values())
        assert torch.equal(st["W1"][1], params["W1"].float())


# ---------------------------------------------------------------------------------------------------------
# validation and precision
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dla", "titans"])
def test_bad_inputs(kind):
    fn = OPS[kind][1]
    x, params, gates, state = make(kind, 2, 5)
    q, k, v = (x[n].detach() for n in "qkv")
    gates = {n: g.detach() for n, g in gates.items()}

    def call(**over):
        kw = dict(q=q, k=k, v=v, params=params, **gates, mini_batch=4)
        kw.update(over)
        return fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("params"), **kw)

    with pytest.raises(ValueError, match="`k`"):
        call(k=k[:, :, :, :4])
    with pytest.raises(ValueError, match="`v`"):
        call(v=v[:, :3])
    with pytest.raises(ValueError, match="K == V"):
        call(v=torch.cat([v, v], dim=-1))
    with pytest.raises(ValueError, match="mini_batch"):
        call(mini_batch=0)
    with pytest.raises(ValueError, match="lr"):
        call(lr=gates["lr"] + 1.0)
    with pytest.raises(ValueError, match="lr"):
        call(lr=gates["lr"][:, :, :1])
    other = "decay" if kind == "dla" else "forget"
    with pytest.raises(ValueError, match=other):
        call(**{other: -gates[other]})
    with pytest.raises(ValueError, match="params"):
        call(params={"W1": params["W1"]})
    with pytest.raises(ValueError, match=r"params\['W2'\]"):
        call(params={"W1": params["W1"], "W2": params["W2"][:, :4]})
    with pytest.raises(ValueError, match="params"):
        call(params=[params["W1"], params["W2"]])
    with pytest.raises(ValueError, match="initial_state"):
        call(initial_state={"W1": state["W1"]})  # W2 missing
    with pytest.raises(ValueError, match="initial_state"):
        call(initial_state={**state, "X": state["W1"]})
    with pytest.raises(ValueError, match=r"initial_state\['W1_mb'\]"):
        call(initial_state={**state, "W1_mb": state["W1"][:1]})
    with pytest.raises(ValueError, match="offset"):
        call(offset=4)
    with pytest.raises(ValueError, match="scale"):
        call(scale=float("nan"))


@pytest.mark.parametrize("kind", ["dla", "titans"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs(kind, dtype):
    naive, chunk = OPS[kind]
    x, params, gates, state = make(kind, 2, 40, dtype=dtype)
    with torch.no_grad():
        o, st = chunk(x["q"], x["k"], x["v"], params, **gates, mini_batch=16, initial_state=state,
                      output_final_state=True)
        up = lambda d: {n: t.double() for n, t in d.items()}
        o_ref, st_ref = naive(x["q"].double(), x["k"].double(), x["v"].double(), up(params), **up(gates),
                              mini_batch=16, initial_state=up(state), output_final_state=True)
    assert o.dtype == dtype and all(s.dtype == torch.float32 for s in st.values())
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert rel(o.double(), o_ref) < tol
    for n in st:
        assert rel(st[n].double(), st_ref[n]) < 1e-5  # states are computed in float32 from the same inputs
