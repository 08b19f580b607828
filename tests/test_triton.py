"""The Triton kernels of the cached reads (`mcrnn.ops.triton`) against a plain PyTorch reference of SPEC §2.3.

Without CUDA the kernels run in Triton's interpreter: this module puts `TRITON_INTERPRET=1` in the environment
while it imports triton (triton fixes the mode at its first import, which pytest's collection of this module
is, unless an earlier module imported triton or `torch._dynamo`) and takes it out again, so the rest of the
suite sees the environment it had. When an earlier module did import triton (in the whole suite, transformers
does), the tests here skip and one test runs this file in a fresh process instead. The `gpu` tests run the
compiled kernels at realistic sizes on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import assert_close
from tests.triton_setup import (
    DEVICE,
    ROOT,
    fresh_process_test,
    gpu,
    kernels_runnable,  # noqa: F401 (an autouse fixture: it must be in the module)
    mt,
    needs_cuda,
)

test_interpreter_in_fresh_process = fresh_process_test(__file__)


# ---------------------------------------------------------------- the reference: SPEC §2.3, literally


def reference(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, *, scale, score_scale, aggregation, top_k=None):
    """Every read `[B, H, T, P, V]` materialised, float64."""
    q, u, r, p_on, pool_p, pool_S = (x.double() for x in (q, u, r, p_on, pool_p, pool_S))
    visible = (vis_lo[None, :] <= seg[:, None]) & (seg[:, None] < vis_hi[None, :])  # [T, P]
    reads = torch.einsum("bhtk,bhpkv->bhtpv", q * scale, pool_S)
    if aggregation == "residual":
        return r + (visible[..., None] * reads).sum(3)
    if aggregation == "mean":
        return (r + (visible[..., None] * reads).sum(3)) / (visible.sum(-1)[:, None] + 1)
    z = torch.einsum("bhtk,bhpk->bhtp", u, pool_p) * score_scale
    z = z.masked_fill(~visible, float("-inf"))
    z_on = (u * p_on).sum(-1, keepdim=True) * score_scale
    if aggregation == "ssc" and top_k < z.shape[-1]:
        z, pick = z.topk(top_k, dim=-1)
        reads = reads.gather(3, pick[..., None].expand(*pick.shape, reads.shape[-1]))
    gamma = torch.softmax(torch.cat([z, z_on], dim=-1), dim=-1)
    return gamma[..., -1:] * r + (gamma[..., :-1, None] * reads).sum(3)


def make_case(B=2, H=2, T=100, K=8, V=12, KS=6, segment=16, n_initial=2, merge=True, dtype=torch.float32,
              pool_dtype=torch.float32, device=DEVICE, seed=0):
    """Inputs of one call: segments of `segment` tokens; `n_initial` caches from a previous call (visible from
    segment 0, one merged away after segment 1) and one cache per completed segment, every other one merged
    away two segments later (as logarithmic segmentation does)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.arange(T) // segment
    n_seg = int(seg[-1]) + 1 if T else 1
    lo = [0] * n_initial + list(range(1, n_seg))
    hi = [n_seg] * n_initial + [n_seg] * (n_seg - 1)
    if merge:
        if n_initial > 1:
            hi[0] = min(2, n_seg)
        for j in range(n_initial, len(hi), 2):
            hi[j] = min(lo[j] + 2, n_seg)
    P = len(lo)

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_()

    tensors = dict(q=leaf(B, H, T, K), u=leaf(B, H, T, KS), r=leaf(B, H, T, V), p_on=leaf(B, H, T, KS),
                   pool_p=leaf(B, H, P, KS, dt=pool_dtype), pool_S=leaf(B, H, P, K, V, dt=pool_dtype))
    index = dict(seg=seg.to(device), vis_lo=torch.tensor(lo, device=device), vis_hi=torch.tensor(hi, device=device))
    d_o = torch.randn(B, H, T, V, generator=g).to(device=device, dtype=dtype)
    return tensors, index, d_o


def run(fn, tensors, index, d_o, **kw):
    names = list(tensors)
    out = fn(*tensors.values(), *index.values(), **kw)
    grads = torch.autograd.grad(out, list(tensors.values()), d_o, allow_unused=True, materialize_grads=True)
    return out, dict(zip(names, grads))


def rms_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """fla's low-precision metric: RMS of the difference over the RMS of the reference."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).square().mean().sqrt() / (b.square().mean().sqrt() + 1e-12)).item()


def check(tensors, index, d_o, aggregation, *, scale, score_scale, top_k=None, tol=2e-5, rms=None):
    """The kernels' output and every gradient against the reference: max relative error <= tol (float32), or
    relative RMS error <= rms (bf16/fp16)."""
    kw = dict(scale=scale, score_scale=score_scale)
    if aggregation == "ssc":
        out, grads = run(mt.ssc_cached_read, tensors, index, d_o, top_k=top_k, **kw)
    else:
        out, grads = run(mt.cached_read, tensors, index, d_o, aggregation=aggregation, **kw)
    ref_out, ref_grads = run(reference, tensors, index, d_o.double(), aggregation=aggregation, top_k=top_k, **kw)
    assert out.dtype == tensors["q"].dtype
    for name, a, b in [("o", out, ref_out), *((n, grads[n], ref_grads[n]) for n in grads)]:
        if rms is None:
            assert_close(a, b, tol, name)
        else:
            assert rms_ratio(a, b) <= rms, f"{name}: relative RMS error {rms_ratio(a, b):.2e} > {rms}"
    return out, grads


# ---------------------------------------------------------------- interpreter (CPU) or GPU, small shapes

LENGTHS = [1, 63, 100, 257]


def segment_for(T: int) -> int:
    """Segments of 16 tokens (up to 7 caches at T = 100); 32 at T = 257 (9 caches) keeps the interpreter quick."""
    return 16 if T <= 100 else 32


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("aggregation", ["grm", "residual", "mean"])
def test_cached_read_float32(aggregation, T):
    tensors, index, d_o = make_case(T=T, segment=segment_for(T))
    check(tensors, index, d_o, aggregation, scale=8**-0.5, score_scale=0.7)


def test_cached_read_one_cache_and_no_cache():
    tensors, index, d_o = make_case(T=40, segment=32, n_initial=0)  # segments [0, 32), [32, 40): one cache
    assert index["vis_lo"].numel() == 1
    check(tensors, index, d_o, "grm", scale=0.3, score_scale=0.5)
    tensors, index, d_o = make_case(T=20, segment=32, n_initial=0)  # one segment: the online read only
    out = mt.cached_read(*tensors.values(), *index.values(), scale=0.3, score_scale=0.5)
    assert torch.equal(out, tensors["r"])


def test_cached_read_soup_is_grm_and_u_defaults_to_q():
    tensors, index, _ = make_case(T=50, KS=8)
    kw = dict(scale=0.4, score_scale=0.6)
    grm = mt.cached_read(*tensors.values(), *index.values(), aggregation="grm", **kw)
    soup = mt.cached_read(*tensors.values(), *index.values(), aggregation="soup", **kw)
    assert torch.equal(grm, soup)
    t = dict(tensors, u=None)
    out = mt.cached_read(*t.values(), *index.values(), aggregation="grm", **kw)
    ref = reference(*dict(tensors, u=tensors["q"]).values(), *index.values(), aggregation="grm", **kw)
    assert_close(out, ref, 2e-5, "u = q")


def test_cached_read_wide_dims():
    """Dims above 16 and not powers of two (the padded blocks), more heads, a long segment."""
    tensors, index, d_o = make_case(B=1, H=3, T=70, K=20, V=33, KS=17, segment=24, n_initial=1)
    check(tensors, index, d_o, "grm", scale=0.2, score_scale=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aggregation", ["grm", "mean"])
def test_cached_read_low_precision(aggregation, dtype):
    tensors, index, d_o = make_case(T=100, dtype=dtype)  # the pool stays float32, as the memories keep it
    check(tensors, index, d_o, aggregation, scale=8**-0.5, score_scale=0.7, rms=8e-3)


def test_cached_read_low_precision_pool():
    tensors, index, d_o = make_case(T=63, dtype=torch.bfloat16, pool_dtype=torch.bfloat16)
    check(tensors, index, d_o, "grm", scale=0.35, score_scale=0.7, rms=8e-3)


@pytest.mark.parametrize("T", LENGTHS)
def test_ssc_float32(T):
    tensors, index, d_o = make_case(T=T, segment=segment_for(T))
    check(tensors, index, d_o, "ssc", top_k=2, scale=8**-0.5, score_scale=0.7)


def test_ssc_top_k_covering_every_cache_is_grm():
    tensors, index, d_o = make_case(T=100, segment=32)
    P = index["vis_lo"].numel()
    kw = dict(scale=0.3, score_scale=0.7)
    out, grads = check(tensors, index, d_o, "ssc", top_k=P + 3, **kw)
    grm, grm_grads = run(mt.cached_read, tensors, index, d_o, aggregation="grm", **kw)
    assert_close(out, grm, 2e-5, "ssc(k >= N) vs grm")
    for n in grads:
        assert_close(grads[n], grm_grads[n], 2e-5, f"d{n}: ssc(k >= N) vs grm")


def test_ssc_bfloat16():
    tensors, index, d_o = make_case(T=100, dtype=torch.bfloat16)
    check(tensors, index, d_o, "ssc", top_k=3, scale=8**-0.5, score_scale=0.7, rms=8e-3)


def test_ssc_read_with_empty_and_repeated_slots():
    """`ssc_read` alone: arbitrary picks, a cache picked twice by one token, empty slots (-1)."""
    g = torch.Generator().manual_seed(3)
    B, H, T, K, V, P, k = 2, 2, 45, 8, 12, 5, 3
    q = torch.randn(B, H, T, K, generator=g).to(DEVICE).requires_grad_()
    w = torch.rand(B, H, T, k, generator=g).to(DEVICE).requires_grad_()
    S = torch.randn(B, H, P, K, V, generator=g).to(DEVICE).requires_grad_()
    pick = torch.randint(-1, P, (B, H, T, k), generator=g).to(DEVICE)
    pick[0, 0, :, 1] = pick[0, 0, :, 0].clamp_min(0)
    d_o = torch.randn(B, H, T, V, generator=g).to(DEVICE)
    out = mt.ssc_read(q, w, S, pick, scale=0.5)
    grads = torch.autograd.grad(out, [q, w, S], d_o)
    qd, wd, Sd = (x.double() for x in (q, w, S))
    sel = Sd.unsqueeze(2).expand(B, H, T, P, K, V).gather(3, pick.clamp_min(0)[..., None, None].expand(
        B, H, T, k, K, V))  # [B, H, T, k, K, V]
    reads = torch.einsum("bhtk,bhtjkv->bhtjv", qd * 0.5, sel)
    ref = ((wd * (pick >= 0))[..., None] * reads).sum(3)
    ref_grads = torch.autograd.grad(ref, [qd, wd, Sd], d_o.double())
    for name, a, b in zip(["o", "q", "weights", "pool_S"], [out, *grads], [ref, *ref_grads]):
        assert_close(a, b, 2e-5, name)


@pytest.mark.parametrize("aggregation", ["grm", "soup", "residual", "mean", "ssc"])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_memory_caching_backend_triton_matches_torch(aggregation, init):
    """The dispatch: `memory_caching(..., backend="triton")` runs the kernels and equals the PyTorch path, output
    and every gradient (the final state does not depend on the backend)."""
    from mcrnn.ops import memory_caching

    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 77, 2, 8, 12
    leaves = [torch.randn(B, T, H, d, generator=g, device=DEVICE).requires_grad_() for d in (K, K, V, K)]
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g, device=DEVICE) + 2).requires_grad_()
    kw = dict(gates={"decay": decay}, segment_size=8, aggregation=aggregation, init=init, top_k=2,
              output_final_state=True)
    outs = {}
    for backend in ("torch", "triton"):
        o, st = memory_caching(*leaves, backend=backend, **kw)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).to(o.device)
        grads = torch.autograd.grad((o * w).sum(), [*leaves, decay], allow_unused=True)  # u: scored only
        outs[backend] = (o, st, [torch.zeros_like(x) if d is None else d for d, x in zip(grads, [*leaves, decay])])
    (o1, s1, g1), (o2, s2, g2) = outs["torch"], outs["triton"]
    assert_close(o2, o1, 2e-5, "output")
    assert_close(s2.cache["S"], s1.cache["S"], 1e-6, "cached states")
    for a, b, name in zip(g2, g1, ["q", "k", "v", "u", "decay"]):
        assert_close(a, b, 2e-5, f"d{name}")


@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
def test_memory_caching_bf16_feeds_the_kernels_bf16(aggregation, monkeypatch):
    """bf16 inputs: the cached-read kernels get bf16 queries (bf16 dots, float32 accumulation, as fla does) while
    the rest runs in float32; the result stays within bf16 error of the PyTorch path."""
    from mcrnn.ops import memory_caching

    seen = []
    name = "ssc_cached_read" if aggregation == "ssc" else "cached_read"
    real = getattr(mt, name)
    monkeypatch.setattr(mt, name, lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw))
    g = torch.Generator().manual_seed(5)
    B, T, H, K = 1, 50, 2, 16
    q, k, v, u = (torch.randn(B, T, H, K, generator=g, device=DEVICE).bfloat16() for _ in range(4))
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g, device=DEVICE) + 2)
    kw = dict(gates={"decay": decay}, segment_size=8, aggregation=aggregation, init="independent", top_k=2)
    ref, _ = memory_caching(q.float(), k.float(), v.float(), u.float(), backend="torch", **kw)
    out, _ = memory_caching(q, k, v, u, backend="triton", **kw)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    rel = (out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert rel < 1e-2, rel


def test_bad_inputs_raise_value_errors():
    tensors, index, _ = make_case(T=40)
    args = dict(**tensors, **index)
    kw = dict(scale=1.0, score_scale=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        mt.cached_read(*args.values(), aggregation="ssc", **kw)
    with pytest.raises(ValueError, match="`r`"):
        mt.cached_read(*dict(args, r=args["r"][:, :, :-1]).values(), **kw)
    with pytest.raises(ValueError, match="`seg` must be non-decreasing"):
        mt.cached_read(*dict(args, seg=args["seg"].flip(0)).values(), **kw)
    with pytest.raises(ValueError, match="float64"):
        mt.cached_read(*{n: (x.double() if x.is_floating_point() else x) for n, x in args.items()}.values(), **kw)
    with pytest.raises(ValueError, match="`pick`"):
        mt.ssc_read(args["q"], args["u"][..., :2], args["pool_S"], args["u"][..., :2], scale=1.0)
    assert mt.unsupported_reason(args["q"], args["pool_S"], "ssc") is None
    assert "aggregation" in mt.unsupported_reason(args["q"], args["pool_S"], "none")


def test_import_mcrnn_ops_does_not_import_triton():
    code = "import sys, mcrnn.ops; assert 'triton' not in sys.modules, 'mcrnn.ops imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_gpu_benchmark_dry_run(tmp_path):
    """`benchmarks/gpu.py --dry-run`: tiny sizes end to end (CPU: the interpreter), one JSON and a table."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--skip-tests",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    result = json.loads(out.read_text())
    names = {row["name"] for row in result["train"]}
    assert {"sdpa", "mc-grm torch", "mc-ssc torch", "kernel grm", "kernel ssc", "linear torch", "linear triton",
            "kernel scan"} <= names, names
    assert all("error" not in row for row in result["train"] + result["decode"]), result
    assert "ms" in proc.stdout


# ---------------------------------------------------------------- CUDA, realistic sizes (`pytest -m gpu`)

#: the compiled kernels multiply bf16 operands (states rounded to bf16 too), which the interpreter never does
GPU_BF16_RMS = 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1000, 2048])
@pytest.mark.parametrize("aggregation", ["grm", "residual", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cached_read(aggregation, T, dtype):
    tensors, index, d_o = make_case(B=2, H=4, T=T, K=128, V=128, KS=128, segment=128, dtype=dtype,
                                    device="cuda")
    check(tensors, index, d_o, aggregation, scale=128**-0.5, score_scale=128**-0.5, tol=1e-4,
          rms=None if dtype == torch.float32 else GPU_BF16_RMS)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1000, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_ssc(T, dtype):
    tensors, index, d_o = make_case(B=2, H=4, T=T, K=128, V=128, KS=128, segment=128, dtype=dtype, device="cuda")
    check(tensors, index, d_o, "ssc", top_k=4, scale=128**-0.5, score_scale=128**-0.5, tol=1e-4,
          rms=None if dtype == torch.float32 else GPU_BF16_RMS)


@gpu
@needs_cuda
def test_gpu_small_dims():
    tensors, index, d_o = make_case(B=2, H=3, T=257, K=8, V=12, KS=6, device="cuda")
    check(tensors, index, d_o, "grm", scale=0.3, score_scale=0.7, tol=1e-4)
    check(tensors, index, d_o, "ssc", top_k=2, scale=0.3, score_scale=0.7, tol=1e-4)


# ---------------------------------------------------------------- compiled for a GPU, without one


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel compiles to a cubin for an H100/H200 (sm_90), in bf16 and float32, with no GPU present:
    the interpreter never runs the bf16 `tl.dot` path, this checks it at least builds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    code = "from mcrnn.ops.triton.aot import compile_all; print(len(compile_all(90)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
