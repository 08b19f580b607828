"""Forward+backward time and peak memory of the deep memories (dla, titans): token loop vs parallel form.

The speed-up compares naive and chunk timed alternately in one process (same machine load). Each
configuration runs in its own subprocess so that its peak resident memory (ru_maxrss, minus the process's
peak before the first call) is its own. Prints a markdown table.

    .venv/bin/python benchmarks/deep_ops.py            # T in {1K, 4K}, naive at 1K (about 2 minutes)
    .venv/bin/python benchmarks/deep_ops.py --quick    # T = 256 only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(memory: str, impl: str, T: int, runs: int, threads: int) -> dict:
    import torch

    from mcrnn.ops.dla import chunk_dla, naive_dla
    from mcrnn.ops.titans import chunk_titans, naive_titans

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    B, H, K, E, mb = 1, 4, 64, 256, 16
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, K).requires_grad_()
    shapes = {"W1": (H, K, E), "W2": (H, E, K)}
    params = {n: (torch.randn(*shape) * 0.02).requires_grad_() for n, shape in shapes.items()}

    def gate(lo, hi):
        return (lo + (hi - lo) * torch.rand(B, T, H)).requires_grad_()

    if memory == "dla":
        fns = {"chunk": chunk_dla, "naive": naive_dla}
        gates = {"lr": gate(0.0, 0.1), "decay": gate(0.9, 1.0)}
    else:
        fns = {"chunk": chunk_titans, "naive": naive_titans}
        gates = {"lr": gate(0.0, 0.1), "momentum": gate(0.5, 0.9), "forget": gate(0.0, 0.1)}

    def step(name):
        o, _ = fns[name](q, k, v, params, **gates, mini_batch=mb)
        o.float().pow(2).mean().backward()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(impl)  # warm-up, and the peak memory of one forward+backward
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    # the naive config also times chunk, interleaved, so that the speed-up sees the same machine load
    names = [impl] if impl == "chunk" else ["naive", "chunk"]
    times = {n: [] for n in names}
    for _ in range(runs):
        for n in names:
            t0 = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times[impl]), "min_s": min(times[impl]), "peak_mib": peak_mib}
    if impl == "naive":
        out["chunk_median_s"] = statistics.median(times["chunk"])
        out["chunk_min_s"] = min(times["chunk"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 256 only (a smoke run)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory, impl, T = args.child.split(",")
        print(json.dumps(measure(memory, impl, int(T), args.runs, args.threads)))
        return
    Ts = [256] if args.quick else [1024, 4096]
    configs = [(m, "chunk", T) for m in ("dla", "titans") for T in Ts]
    configs += [(m, "naive", Ts[0]) for m in ("dla", "titans")]
    results = {}
    for m, impl, T in configs:
        cmd = [sys.executable, __file__, "--child", f"{m},{impl},{T}", "--runs", str(args.runs),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[(m, impl, T)] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# {m} {impl} T={T}: {results[(m, impl, T)]}", file=sys.stderr)
    print(f"float32, CPU, torch.set_num_threads({args.threads}), B=1, H=4, K=V=64, E=256 (depth 2), "
          f"mini_batch=16; forward+backward, median of {args.runs} runs after one warm-up\n")
    print("| memory | impl | T | fwd+bwd median (s) | min (s) | peak RSS delta (MiB) | chunk speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m, impl, T in configs:
        r = results[(m, impl, T)]
        speed = ""
        if impl == "naive":
            ratio_med, ratio_min = r["median_s"] / r["chunk_median_s"], r["min_s"] / r["chunk_min_s"]
            speed = (f"{ratio_med:.1f}x median, {ratio_min:.1f}x min "
                     f"(chunk {r['chunk_median_s']:.3f} / {r['chunk_min_s']:.3f} s)")
        row = [m, impl, T, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['peak_mib']:.0f}", speed]
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
