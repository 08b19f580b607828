"""Forward+backward time and peak memory of the ops, against causal SDPA and the base memory.

Every configuration runs in its own subprocess (so its peak RSS is its own): inputs are built, the op runs once
(the peak-memory run: growth of the process's max RSS over the inputs), then `--runs` timed runs; the median
is reported. Threads are pinned (default 2, the CI machine).

    python benchmarks/ops.py                      # T in {1K, 4K, 16K, 32K}, linear memory, all aggregations
    python benchmarks/ops.py --lengths 16384 32768   # the long rows only
    python benchmarks/ops.py --quick              # T = 1K only, 3 runs
    python benchmarks/ops.py --deep               # dla/titans at T in {1K, 4K} (without MC, grm, soup)
    python benchmarks/ops.py --pypi               # vs memory-caching==0.1.0 (pip install memory-caching==0.1.0)
    python benchmarks/ops.py --json results/bench/ops.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

B, H, K = 1, 4, 64


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _make_case(case: dict):
    """Build the inputs and a zero-argument function running forward + backward."""
    import torch
    import torch.nn.functional as F

    from mcrnn.ops import chunk_linear, memory_caching

    T, kind = case["T"], case["kind"]
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).requires_grad_()

    if kind == "pypi":
        return _pypi_case(case)
    if kind == "mcrnn_layer":
        return _mcrnn_layer_case(case)
    q, k, v, u = (leaf(B, T, H, K) for _ in range(4))
    q = F.normalize(q.detach(), dim=-1).requires_grad_()
    k = F.normalize(k.detach(), dim=-1).requires_grad_()
    leaves = [q, k, v, u]
    if kind == "matmul":  # plain GEMMs with the FLOPs of GRM's cache reads (forward + backward), see grm_read_flops
        reps, n = case["reps"], case["n"]
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)

        def run():
            for _ in range(reps):
                a @ b
        return run
    if kind == "sdpa":
        def run():
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
            o.sum().backward()
    elif kind == "linear":
        def run():
            o, _ = chunk_linear(q, k, v)
            o.sum().backward()
    else:  # memory caching over `memory`
        memory = case["memory"]
        kw = dict(memory=memory, aggregation=kind, segment_size=case.get("segment_size", 256), top_k=case.get("top_k"))
        if memory in ("dla", "titans"):
            E = 4 * K
            params = {"W1": (torch.randn(H, K, E, generator=g) / E**0.5).requires_grad_(),
                      "W2": (torch.randn(H, E, K, generator=g) / K**0.5).requires_grad_()}
            names = ("lr", "decay") if memory == "dla" else ("lr", "momentum", "forget")
            gates = {n: torch.full((B, T, H), 0.1 if n in ("lr", "forget") else 0.9).requires_grad_() for n in names}
            kw.update(params=params, gates=gates, mini_batch=16)
            leaves += [*params.values(), *gates.values()]
        else:
            gates = {"decay": torch.sigmoid(torch.randn(B, T, H, generator=g) + 3).requires_grad_()}
            if memory in ("delta", "gdn"):
                gates["beta"] = torch.sigmoid(torch.randn(B, T, H, generator=g)).requires_grad_()
                if memory == "delta":
                    del gates["decay"]
            kw.update(gates=gates)
            leaves += list(gates.values())

        def run():
            o, _ = memory_caching(q, k, v, u, **kw)
            o.sum().backward()

    def run_and_clear():
        run()
        for x in leaves:
            x.grad = None

    return run_and_clear


def _layer_inputs(case):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(1, case["T"], case["d_model"], generator=g).requires_grad_()


def _pypi_case(case: dict):
    """memory-caching 0.1.0's layer (its own q/k/v/u/o projections), GRM, linear backend."""
    from memory_caching import LinearMemoryBackend, MCConfig, MemoryCachingLayer

    cfg = MCConfig(d_model=case["d_model"], num_heads=case["heads"], backend="linear", aggregation="grm",
                   segment_size=case["segment_size"])
    layer = MemoryCachingLayer(config=cfg, backend=LinearMemoryBackend())
    x = _layer_inputs(case)

    def run():
        layer(x).sum().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return run


def _mcrnn_layer_case(case: dict):
    """The same layer shape in mcrnn: q/k/v/u/o projections around `memory_caching` (GRM, linear)."""
    import torch

    from mcrnn.ops import memory_caching

    d, h = case["d_model"], case["heads"]
    proj = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(5))
    x = _layer_inputs(case)

    def run():
        q, k, v, u = (p(x).view(1, case["T"], h, d // h) for p in proj[:4])
        o, _ = memory_caching(q, k, v, u, aggregation="grm", segment_size=case["segment_size"])
        proj[4](o.reshape(1, case["T"], d)).sum().backward()
        proj.zero_grad(set_to_none=True)
        x.grad = None

    return run


def grm_read_flops(T: int, segment_size: int = 256) -> float:
    """FLOPs of GRM's cache reads at length T, forward and backward: token t reads its `n_t` visible caches
    (`K x V` each) forward, and the backward needs the same products for `d_w`, `d_q` and `d_S`: 4 GEMMs of
    `2 · K · V` FLOPs per (token, cache) pair, per head."""
    pairs = sum(t // segment_size for t in range(T))  # caches visible to token t (constant segments)
    return 4 * 2 * K * K * pairs * B * H


def matmul_case(T: int) -> dict:
    """A plain `n x n` GEMM repeated to the FLOPs of GRM's reads at length T: how fast this machine multiplies."""
    n = 1024
    return dict(T=T, kind="matmul", n=n, reps=max(1, round(grm_read_flops(T) / (2 * n**3))))


def child(case: dict, runs: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    run = _make_case(case)
    before = _rss_mb()
    t0 = time.perf_counter()
    run()  # the peak-memory run (also the warm-up)
    first = time.perf_counter() - t0
    peak = _rss_mb() - before
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first, "peak_mb": peak,
            "runs": runs}


def measure(case: dict, runs: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(case), "--runs", str(runs),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import torch

    return f"{model}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, Python {platform.python_version()}"


def label(case: dict) -> str:
    kind = case["kind"]
    if kind in ("sdpa", "linear"):
        return {"sdpa": "causal SDPA", "linear": "chunk_linear (base)"}[kind]
    if kind == "matmul":
        return f"torch.matmul, GRM's read FLOPs ({case['reps']} x {case['n']}^3 GEMMs)"
    if kind in ("pypi", "mcrnn_layer"):
        return {"pypi": "memory-caching 0.1.0 layer", "mcrnn_layer": "mcrnn layer"}[kind]
    extra = f", top_k={case['top_k']}" if case.get("top_k") else ""
    return f"MC {case['memory']} {kind}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deep", action="store_true", help="dla/titans rows instead of the linear memory")
    ap.add_argument("--pypi", action="store_true", help="compare with memory-caching==0.1.0")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.runs, args.threads)))
        return

    rows = []
    if args.pypi:
        base = dict(T=1024, d_model=128, heads=2, segment_size=64)
        cases = [dict(base, kind="pypi"), dict(base, kind="mcrnn_layer")]
        groups = {1024: cases}
    else:
        default = [1024, 4096] if args.deep else [1024, 4096, 16384, 32768]
        lengths = args.lengths or ([1024] if args.quick else default)
        groups = {}
        for T in lengths:
            if args.deep:
                cases = [dict(T=T, kind="sdpa")]
                for mem in ("dla", "titans"):
                    cases += [dict(T=T, kind=a, memory=mem) for a in ("none", "grm", "soup")]
            else:
                cases = [dict(T=T, kind="sdpa"), dict(T=T, kind="linear")]
                cases += [dict(T=T, kind=a, memory="linear") for a in ("residual", "grm", "soup")]
                cases += [dict(T=T, kind="ssc", memory="linear", top_k=4)]
                cases += [dict(T=T, kind=a, memory="gdn") for a in ("none", "grm")]  # the delta rule
                if T > 256:
                    cases += [matmul_case(T)]
            groups[T] = cases
    print(f"machine: {machine()}; threads {args.threads}; median of {args.runs} runs after one warm-up/peak run")
    print("command: python " + " ".join(sys.argv))
    print()
    print("| T | op | fwd+bwd (s) | x SDPA time | x base time | peak mem (MB) | x SDPA mem |")
    print("|---|---|---|---|---|---|---|")
    for T, cases in groups.items():
        results = [(c, measure(c, args.runs, args.threads)) for c in cases]
        ref = {c["kind"]: r for c, r in results if "error" not in r}
        base_of = {c.get("memory"): r for c, r in results if c["kind"] == "none" and "error" not in r}
        sd = ref.get("sdpa") or ref.get("pypi")
        for c, r in results:
            bs = ref.get("linear") or base_of.get(c.get("memory"))  # the same memory without MC
            rows.append({"case": c, "result": r})
            if "error" in r:
                print(f"| {T} | {label(c)} | error: {r['error']} | | | | |")
                continue
            ratio = lambda a, b, key: f"{a[key] / b[key]:.3f}" if b and b[key] > 0 else "-"
            print(f"| {T} | {label(c)} | {r['median_s']:.3f} | {ratio(r, sd, 'median_s')} | "
                  f"{ratio(r, bs, 'median_s')} | {r['peak_mb']:.0f} | {ratio(r, sd, 'peak_mb')} |")
        if "matmul" in ref and "grm" in ref:
            flops = grm_read_flops(T)
            g_mm, g_grm = flops / ref["matmul"]["median_s"], flops / ref["grm"]["median_s"]
            print(f"|   | GRM reads at T={T}: {flops / 1e9:.1f} GFLOP; matmul {g_mm / 1e9:.1f} GFLOP/s; GRM (whole op, "
                  f"reads only counted) {g_grm / 1e9:.1f} GFLOP/s = {g_grm / g_mm:.2f} of the matmul rate | | | | |")
    if args.pypi and "pypi" in ref and "mcrnn_layer" in ref:
        print(f"\nmcrnn speed-up over memory-caching 0.1.0 (median fwd+bwd): "
              f"{ref['pypi']['median_s'] / ref['mcrnn_layer']['median_s']:.0f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
