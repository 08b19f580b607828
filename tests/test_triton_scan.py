"""The Triton scan of the base linear memory (`mcrnn.ops.triton.chunk_scan`) against `linear_scan` and a token loop.

Without CUDA the kernels run in Triton's interpreter, set up as in `tests/test_triton.py`: this module puts
`TRITON_INTERPRET=1` in the environment while it imports triton and takes it out again; when an earlier module
already imported triton in GPU mode (the whole suite in one process), the tests here skip and
`test_interpreter_in_fresh_process` runs this file in a fresh process. The `gpu` tests run the compiled kernels
at realistic sizes on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mcrnn.ops.linear.chunk import linear_scan
from tests.helpers import assert_close
from tests.triton_setup import (
    DEVICE,
    fresh_process_test,
    gpu,
    kernels_runnable,  # noqa: F401 (an autouse fixture: it must be in the module)
    mt,
    needs_cuda,
)

test_interpreter_in_fresh_process = fresh_process_test(__file__)


# ---------------------------------------------------------------- the reference: the recurrence, token by token


def token_loop(q, k, v, log_decay, resets, initial_state, positions):
    """`S_t = a_t S_{t-1} + k_t v_tᵀ` (zero before a reset token), `o_t = q_tᵀ S_t`, one token at a time."""
    B, H, T, K = k.shape
    S = initial_state if initial_state is not None else k.new_zeros(B, H, K, v.shape[-1])
    reset, states, outs = set(resets), [], []
    for t in range(T):
        if t in reset:
            S = torch.zeros_like(S)
        elif log_decay is not None:
            S = torch.exp(log_decay[:, :, t, None, None]) * S
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        states.append(S)
        if q is not None:
            outs.append((q[:, :, t, :, None] * S).sum(-2))
    o = torch.stack(outs, dim=2) if q is not None else None
    snaps = torch.stack([states[e - 1] for e in positions], dim=2) if len(positions) else None
    return o, snaps, S


def make_case(B=2, H=3, T=100, K=8, V=12, decay=True, initial=True, with_q=True, dtype=torch.float32,
              device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    q = leaf(B, H, T, K, scale=K**-0.5) if with_q else None
    k = leaf(B, H, T, K, scale=K**-0.5)
    v = leaf(B, H, T, V)
    # a decay near 1 and some tokens at the -60 floor (gates of ~0). Not token 0: at T = 1 every gradient of the
    # decay would then be ~1e-26, and the kernel's `q·dq − k·dk` (fla's form) is exact only to ~1e-7 of |q||dq|
    log_a = torch.log(torch.sigmoid(torch.randn(B, H, T, generator=g) * 2 + 2))
    log_a[..., 11::23] = -60.0
    log_decay = log_a.to(device=device, dtype=dtype).requires_grad_() if decay else None
    s0 = leaf(B, H, K, V) if initial else None
    return dict(q=q, k=k, v=v, log_decay=log_decay, initial_state=s0)


def run(fn, inputs, resets, positions, weights, cast=None):
    """Outputs of `fn` and the gradients of `Σ <output, weight>` over the weighted outputs (a weight of None
    leaves that output out of the loss), for every input that is not None."""
    names = [n for n, x in inputs.items() if x is not None]
    xs = {n: (x.detach().to(cast).requires_grad_() if cast is not None else x) if x is not None else None
          for n, x in inputs.items()}
    o, snaps, final = fn(xs["q"], xs["k"], xs["v"], xs["log_decay"], resets, xs["initial_state"], positions)
    loss = 0.0
    for out, w in zip((o, snaps, final), weights):
        if out is not None and w is not None:
            loss = loss + (out.double() * w.double()).sum()
    grads = torch.autograd.grad(loss, [xs[n] for n in names], allow_unused=True, materialize_grads=True)
    return {"o": o, "snapshots": snaps, "final": final, **{f"d{n}": d for n, d in zip(names, grads)}}


def weights_for(inputs, positions, seed=1, use=("o", "snapshots", "final")):
    k, v = inputs["k"], inputs["v"]
    B, H, T, K = k.shape
    V = v.shape[-1]
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(B, H, T, V, generator=g), torch.randn(B, H, len(positions), K, V, generator=g),
         torch.randn(B, H, K, V, generator=g)]
    return [x.to(k.device) if name in use else None for name, x in zip(("o", "snapshots", "final"), w)]


def torch_scan(q, k, v, log_decay, resets, initial_state, positions):
    return linear_scan(q, k, v, log_decay, resets=resets, initial_state=initial_state, positions=positions)


def check(inputs, resets, positions, *, tol=1e-5, ref_tol=2e-5, rms=None, use=("o", "snapshots", "final")):
    """The kernel against `linear_scan` in the inputs' dtype (float32: within `tol`) and against the token loop in
    float64 (within `ref_tol`; bf16/fp16: relative RMS error within `rms`), outputs and every gradient."""
    w = weights_for(inputs, positions, use=use)
    out = run(mt.chunk_scan, inputs, resets, positions, w)
    ref = run(token_loop, inputs, resets, positions, w, cast=torch.float64)
    if inputs["q"] is not None:
        assert out["o"].dtype == inputs["q"].dtype
    assert out["final"].dtype == torch.float32
    if rms is None:
        same = run(torch_scan, inputs, resets, positions, w)
    for name, b in ref.items():
        a = out[name]
        if b is None:
            assert a is None, name
            continue
        if rms is None:
            assert_close(a, same[name], tol, f"{name} vs linear_scan")
            assert_close(a, b, ref_tol, f"{name} vs the float64 token loop")
        else:
            assert rms_ratio(a, b) <= rms, f"{name}: relative RMS error {rms_ratio(a, b):.2e} > {rms}"
    return out


def rms_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """fla's low-precision metric: RMS of the difference over the RMS of the reference."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).square().mean().sqrt() / (b.square().mean().sqrt() + 1e-12)).item()


# ---------------------------------------------------------------- interpreter (CPU) or GPU, small shapes

#: (T, resets, positions): odd lengths, chunk boundaries (64), a reset at 0, several resets in one chunk,
#: snapshots at chunk ends, unsorted and repeated snapshots
CASES = [
    (1, (), (1,)),
    (63, (0,), (63, 1, 32)),
    (64, (63,), (64, 63)),
    (100, (5, 17, 20, 21, 64, 99), (1, 64, 65, 100, 30, 17, 30)),
    (257, (0, 128, 200), (64, 128, 129, 257, 3)),
]


@pytest.mark.parametrize("T, resets, positions", CASES)
def test_scan_float32(T, resets, positions):
    check(make_case(T=T), resets, positions)


@pytest.mark.parametrize("decay, initial", [(False, True), (True, False), (False, False)])
def test_scan_without_decay_or_initial_state(decay, initial):
    check(make_case(T=100, decay=decay, initial=initial), (3, 70), (50, 100, 64))


def test_scan_no_resets_no_positions_one_head():
    check(make_case(B=1, H=1, T=130), (), ())


def test_scan_without_queries():
    """`q = None` (the Fenwick levels of independent logarithmic MC): snapshots and the final state only."""
    check(make_case(T=100, with_q=False), (10, 64), (64, 99, 12))


@pytest.mark.parametrize("use", [("o",), ("snapshots",), ("final",)])
def test_scan_gradient_of_one_output(use):
    """The others' gradients never arrive (None): each output's own gradient path alone."""
    check(make_case(T=90), (7, 40), (20, 64, 90), use=use)


def test_scan_wide_dims():
    """Dims not powers of two (padded blocks), K and V over two blocks of 64 (the split paths)."""
    check(make_case(B=1, H=2, T=70, K=72, V=80), (0, 33), (33, 64, 70))
    check(make_case(B=1, H=1, T=40, K=20, V=36), (), (33,))


def test_scan_head_dim_above_128():
    """K above 128: chunks of 32 tokens (boundaries at 32, 64) and four key blocks in the backward pass."""
    check(make_case(B=1, H=1, T=70, K=130, V=12), (40,), (31, 32, 33, 70))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_low_precision(dtype):
    check(make_case(T=100, dtype=dtype), (5, 64), (32, 64, 100), rms=8e-3)


def test_scan_bad_inputs_raise_value_errors():
    x = make_case(T=20)
    with pytest.raises(ValueError, match="`resets`"):
        mt.chunk_scan(**x, resets=(20,))
    with pytest.raises(ValueError, match="`positions`"):
        mt.chunk_scan(x["q"], x["k"], x["v"], x["log_decay"], (), x["initial_state"], (0,))
    with pytest.raises(ValueError, match="`log_decay`"):
        mt.chunk_scan(x["q"], x["k"], x["v"], x["log_decay"][:, :, :-1])
    with pytest.raises(ValueError, match="`initial_state`"):
        mt.chunk_scan(x["q"], x["k"], x["v"], None, (), x["initial_state"][..., :-1])
    with pytest.raises(ValueError, match="float64"):
        mt.chunk_scan(**{n: t.double() for n, t in x.items()})
    assert mt.scan_unsupported_reason(x["q"], x["k"], x["v"]) is None
    assert "float64" in mt.scan_unsupported_reason(x["q"], x["k"].double(), x["v"])
    assert "head dim" in mt.scan_unsupported_reason(None, x["k"], x["v"].new_zeros(2, 3, 20, 300))


# ---------------------------------------------------------------- dispatch: linear_scan, chunk_linear, MC


def test_linear_scan_backend_dispatch(monkeypatch):
    """`linear_scan(..., backend="triton")` runs the kernel (same results), "torch" never does, and a call the
    kernel does not cover (float64) falls back to PyTorch."""
    calls = []
    kernel = mt.chunk_scan
    monkeypatch.setattr(mt, "chunk_scan", lambda *a: calls.append(1) or kernel(*a))
    x = make_case(T=70)
    resets, positions = (0, 40), (40, 70)
    w = weights_for(x, positions)
    fn = lambda backend: lambda *a: linear_scan(*a[:4], resets=a[4], initial_state=a[5], positions=a[6],
                                                backend=backend)
    a = run(fn("triton"), x, resets, positions, w)
    assert len(calls) == 1
    b = run(fn("torch"), x, resets, positions, w)
    assert len(calls) == 1
    for name in a:
        assert_close(a[name], b[name], 1e-5, name)
    run(fn("triton"), x, resets, positions, w, cast=torch.float64)
    assert len(calls) == 1
    run(fn("auto"), x, resets, positions, w)  # "auto": the kernels for CUDA tensors only
    assert len(calls) == (2 if DEVICE == "cuda" else 1)
    with pytest.raises(ValueError, match="backend"):
        linear_scan(x["q"], x["k"], x["v"], backend="cuda")


def test_chunk_linear_backend_from_the_environment(monkeypatch):
    from mcrnn.ops import chunk_linear

    calls = []
    kernel = mt.chunk_scan
    monkeypatch.setattr(mt, "chunk_scan", lambda *a: calls.append(1) or kernel(*a))
    q = torch.randn(1, 20, 2, 8, device=DEVICE)
    monkeypatch.setenv("MCRNN_BACKEND", "triton")
    chunk_linear(q, q, q)
    assert len(calls) == 1
    monkeypatch.setenv("MCRNN_BACKEND", "torch")
    chunk_linear(q, q, q)
    assert len(calls) == 1
    monkeypatch.setenv("MCRNN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MCRNN_BACKEND"):
        chunk_linear(q, q, q)


@pytest.mark.parametrize("op", ["chunk_linear", "chunk_swla"])
def test_chunk_ops_backend_triton(op):
    import mcrnn.ops as ops

    fn = getattr(ops, op)
    g = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 75, 2, 8, 12
    q, k, v = (torch.randn(B, T, H, d, generator=g).to(DEVICE).requires_grad_() for d in (K, K, V))
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g) + 2).to(DEVICE).requires_grad_()
    s0 = torch.randn(B, H, K, V, generator=g).to(DEVICE)
    s0 = s0 if op == "chunk_linear" else {"S": s0, "k": torch.randn(B, H, K).to(DEVICE),
                                          "v": torch.randn(B, H, V).to(DEVICE)}
    d_o = torch.randn(B, T, H, V, generator=g).to(DEVICE)
    res = {}
    for backend in ("torch", "triton"):
        o, final = fn(q, k, v, decay=decay, initial_state=s0, output_final_state=True, backend=backend)
        S = final if op == "chunk_linear" else final["S"]
        res[backend] = (o, S, *torch.autograd.grad((o * d_o).sum() + S.sum(), [q, k, v, decay]))
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ddecay"], res["triton"], res["torch"]):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("memory, aggregation, init, segmentation", [
    *((m, a, i, "constant") for m in ("linear", "swla") for a in ("grm", "ssc") for i in ("checkpoint", "independent")),
    ("linear", "grm", "independent", "logarithmic"),  # the Fenwick levels: scans without queries
])
def test_memory_caching_backend_triton_matches_torch(memory, aggregation, init, segmentation, monkeypatch):
    """Memory Caching end to end with the scan (and the reads) in the kernels: output, final state (the online
    memory and the caches, i.e. the snapshots) and every gradient equal the PyTorch path's."""
    from mcrnn.ops import memory_caching

    calls = []
    kernel = mt.chunk_scan
    monkeypatch.setattr(mt, "chunk_scan", lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 77, 2, 8, 12
    leaves = [torch.randn(B, T, H, d, generator=g).to(DEVICE).requires_grad_() for d in (K, K, V, K)]
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g) + 2).to(DEVICE).requires_grad_()
    kw = dict(memory=memory, gates={"decay": decay}, segment_size=16 if segmentation == "constant" else 8,
              segmentation=segmentation, aggregation=aggregation, init=init, top_k=2, output_final_state=True)
    outs = {}
    for backend in ("torch", "triton"):
        o, st = memory_caching(*leaves, backend=backend, **kw)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).to(o.device)
        loss = (o * w).sum() + st.cache["S"].square().sum() + st.online["S"].sum()
        grads = torch.autograd.grad(loss, [*leaves, decay])
        outs[backend] = (o, st, grads)
    assert calls, "backend='triton' did not run the scan kernel"
    (o1, s1, g1), (o2, s2, g2) = outs["torch"], outs["triton"]
    assert_close(o2, o1, 2e-5, "output")
    assert_close(s2.cache["S"], s1.cache["S"], 2e-6, "cached states")
    assert_close(s2.online["S"], s1.online["S"], 2e-6, "online state")
    for a, b, name in zip(g2, g1, ["q", "k", "v", "u", "decay"]):
        assert_close(a, b, 2e-5, f"d{name}")


@pytest.mark.parametrize("memory", ["linear", "swla"])
def test_memory_caching_bf16_feeds_the_scan_kernel_bf16(memory, monkeypatch):
    """bf16 inputs: the scan kernel gets bf16 q, k, v (bf16 dots, float32 accumulation and states) and the result
    stays within bf16 error of the float32 PyTorch path."""
    from mcrnn.ops import memory_caching

    seen = []
    kernel = mt.chunk_scan
    monkeypatch.setattr(mt, "chunk_scan", lambda q, k, v, *a: seen.append((k.dtype, v.dtype)) or kernel(q, k, v, *a))
    g = torch.Generator().manual_seed(6)
    B, T, H, K = 1, 70, 2, 16
    q, k, v, u = (torch.randn(B, T, H, K, generator=g).to(DEVICE).bfloat16() for _ in range(4))
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g) + 2).to(DEVICE)
    kw = dict(memory=memory, gates={"decay": decay}, segment_size=16, aggregation="grm", init="independent",
              output_final_state=True)
    ref, s_ref = memory_caching(q.float(), k.float(), v.float(), u.float(), backend="torch", **kw)
    out, s_out = memory_caching(q, k, v, u, backend="triton", **kw)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert out.dtype == torch.bfloat16 and s_out.online["S"].dtype == torch.float32
    rms = lambda x: x.float().pow(2).mean().sqrt()  # noqa: E731
    assert rms(out.float() - ref) / rms(ref) < 1e-2
    assert rms(s_out.cache["S"] - s_ref.cache["S"]) / rms(s_ref.cache["S"]) < 1e-2


# ---------------------------------------------------------------- CUDA, realistic sizes (`pytest -m gpu`)

#: the compiled kernels multiply bf16 operands (inputs and states rounded to bf16), which the interpreter never does
GPU_BF16_RMS = 1e-2


def gpu_case(T, dtype, K=128, V=128, segment=256):
    x = make_case(B=2, H=4, T=T, K=K, V=V, dtype=dtype, device="cuda")
    resets = tuple(range(0, T, 3 * segment))  # independent segments every third one, a reset at 0 among them
    positions = tuple(range(segment, T + 1, segment)) + ((T,) if T % segment else ())
    return x, resets, positions


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1000, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_scan(T, dtype):
    x, resets, positions = gpu_case(T, dtype)
    check(x, resets, positions, tol=1e-4, ref_tol=1e-4, rms=None if dtype == torch.float32 else GPU_BF16_RMS)


@gpu
@needs_cuda
def test_gpu_scan_small_and_wide_dims():
    check(make_case(T=257, device="cuda"), (0, 100, 130), (64, 100, 257), tol=1e-4, ref_tol=1e-4)
    check(make_case(B=1, H=2, T=300, K=200, V=136, device="cuda"), (7,), (64, 300), tol=1e-4, ref_tol=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_gpu_memory_caching_backend_triton_matches_torch(init):
    from mcrnn.ops import memory_caching

    g = torch.Generator().manual_seed(3)
    B, T, H, K = 2, 1000, 4, 128
    leaves = [torch.randn(B, T, H, K, generator=g).cuda().requires_grad_() for _ in range(4)]
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g) + 4).cuda().requires_grad_()
    kw = dict(gates={"decay": decay}, segment_size=128, aggregation="grm", init=init, output_final_state=True)
    res = {}
    for backend in ("torch", "triton"):
        o, st = memory_caching(*leaves, backend=backend, **kw)
        res[backend] = (o, st.cache["S"], *torch.autograd.grad(o.square().sum(), [*leaves, decay]))
    for name, a, b in zip(["o", "caches", "dq", "dk", "dv", "du", "ddecay"], res["triton"], res["torch"]):
        assert_close(a, b, 1e-4, name)
