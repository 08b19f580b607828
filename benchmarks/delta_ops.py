"""Forward+backward time of the delta-rule ops (`chunk_gdn`, `chunk_delta`) against `chunk_linear`, causal SDPA
and the token loop, all measured in the same run (B=1, H=4, K=V=64, float32, CPU).

Every configuration runs in its own subprocess: inputs are built, the op runs once (warm-up and peak-memory run:
growth of the process's max RSS), then `--runs` timed runs. `--rounds` repeats the whole list of cases,
interleaved, so that a shared machine's load hits every case alike; the figure is the median over all timed
runs of all rounds, and the ratios divide medians taken in the same run. The backward pass starts from a dense
random output gradient.

    python benchmarks/delta_ops.py                    # T in {4K, 16K}: gdn, delta vs chunk_linear and SDPA;
                                                      # T = 1K: the parallel path vs the token loops
    python benchmarks/delta_ops.py --quick            # 4K and 1K only, fewer runs
    python benchmarks/delta_ops.py --json results/bench/delta_ops.json
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


def _rank_one_loop(q, k, v, beta, decay):
    """The gated delta rule as a user would loop it: `S ← a S; S += k (β (v − Sᵀk))ᵀ`, O(K·V) per token."""
    import torch

    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        S = decay[:, t, :, None, None] * S
        err = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t.unsqueeze(-1) * err.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K**-0.5, S))
    return torch.stack(outs, 1)


def _make_case(case: dict):
    """Build the inputs and a zero-argument function running forward + backward."""
    import torch
    import torch.nn.functional as F

    from mcrnn.ops import chunk_delta, chunk_gdn, chunk_linear, naive_gdn

    T, kind = case["T"], case["kind"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, K, generator=g).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g)).requires_grad_()
    decay = torch.sigmoid(torch.randn(B, T, H, generator=g) + 3).requires_grad_()
    leaves = [q, k, v, beta, decay]
    ops = {
        "sdpa": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ),
        "linear": lambda: chunk_linear(q, k, v, decay=decay)[0],
        "gdn": lambda: chunk_gdn(q, k, v, beta, decay)[0],
        "delta": lambda: chunk_delta(q, k, v, beta)[0],
        "gdn_naive": lambda: naive_gdn(q, k, v, beta, decay)[0],
        "gdn_loop": lambda: _rank_one_loop(q, k, v, beta, decay),
    }
    op = ops[kind]
    # a dense upstream gradient, as in training (`o.sum()` would send an expanded, stride-0 one)
    d_out = torch.randn(B, T, H, K, generator=g)
    if kind == "sdpa":
        d_out = d_out.transpose(1, 2)

    def run():
        op().backward(d_out)
        for x in leaves:
            x.grad = None

    return run


def child(case: dict, runs: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    run = _make_case(case)
    before = _rss_mb()
    run()  # warm-up and peak-memory run
    peak = _rss_mb() - before
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak_mb": peak}


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


LABELS = {
    "sdpa": "causal SDPA",
    "linear": "chunk_linear (decay)",
    "gdn": "chunk_gdn",
    "delta": "chunk_delta",
    "gdn_naive": "naive_gdn (token loop, SPEC form)",
    "gdn_loop": "token loop (rank-1 update)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per subprocess")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the whole case list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.runs, args.threads)))
        return

    long_lengths = [4096] if args.quick else [4096, 16384]
    groups = {T: ["sdpa", "linear", "gdn", "delta"] for T in long_lengths}
    groups[1024] = ["gdn", "gdn_loop", "gdn_naive"]
    rounds = 1 if args.quick else args.rounds
    results: dict[tuple[int, str], dict] = {}
    for _ in range(rounds):
        for T, kinds in groups.items():
            for kind in kinds:
                r = measure(dict(T=T, kind=kind), args.runs, args.threads)
                acc = results.setdefault((T, kind), {"times": [], "peak_mb": 0.0})
                if "error" in r:
                    acc["error"] = r["error"]
                    continue
                acc["times"] += r["times"]
                acc["peak_mb"] = max(acc["peak_mb"], r["peak_mb"])
    for acc in results.values():
        if acc["times"]:
            acc["median_s"] = statistics.median(acc["times"])

    print(f"machine: {machine()}; threads {args.threads}; load average at the end {os.getloadavg()[0]:.2f}; "
          f"median of {args.runs} runs x {rounds} interleaved rounds, after one warm-up run per subprocess")
    print("command: python " + " ".join(sys.argv))
    print()
    print("| T | op | fwd+bwd (s) | x SDPA | x chunk_linear | x chunk_gdn | peak mem (MB) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for T, kinds in groups.items():
        ref = {kind: results[(T, kind)].get("median_s") for kind in kinds}
        for kind in kinds:
            r = results[(T, kind)]
            rows.append({"T": T, "kind": kind, **r})
            if "median_s" not in r:
                print(f"| {T} | {LABELS[kind]} | error: {r.get('error')} | | | | |")
                continue
            x = [f"{r['median_s'] / ref[b]:.2f}" if ref.get(b) else "-" for b in ("sdpa", "linear", "gdn")]
            print(f"| {T} | {LABELS[kind]} | {r['median_s']:.4f} | {' | '.join(x)} | {r['peak_mb']:.0f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
