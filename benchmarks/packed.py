"""Packed sequences (`cu_seqlens`) against the same tokens unpacked: forward+backward time of `memory_caching`.

    python benchmarks/packed.py                 # T = 4096 tokens, H = 4, K = V = 64, segment_size 256
    python benchmarks/packed.py --T 8192 --runs 5 --docs 200

Rows per aggregation (fastest of `--runs` interleaved rounds, the least disturbed on a shared machine):
  unpacked [n, L]      n equal sequences as a batch
  packed equal         the same sequences packed into [1, n·L] with `cu_seqlens`
  one sequence [1, T]  the same tokens as one sequence (no `cu_seqlens`)
  packed ragged        [1, T] cut into random document lengths, with `cu_seqlens`
The packed ratios are against the unpacked batch (equal) and against one sequence (ragged).
"""

from __future__ import annotations

import argparse
import time

import torch

from mcrnn.ops import memory_caching


def _times(fns, runs: int) -> list[float]:
    """Fastest of `runs` for each function, run in interleaved rounds so that the load of a shared machine falls
    on all of them alike (the fastest run is the least disturbed one)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _case(shape, agg, H, K, cu=None):
    g = torch.Generator().manual_seed(0)
    B, T = shape
    q, k, v, u = (torch.randn(B, T, H, K, generator=g).requires_grad_() for _ in range(4))
    decay = torch.rand(B, T, H, generator=g).mul(0.1).add(0.9)

    def run():
        o, _ = memory_caching(q, k, v, u, gates={"decay": decay}, aggregation=agg, top_k=2, cu_seqlens=cu)
        o.sum().backward()

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--n", type=int, default=8, help="equal sequences")
    ap.add_argument("--docs", type=int, default=24, help="ragged: about this many random document lengths")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T, n, H, K = args.T, args.n, 4, 64
    L = T // n
    equal = torch.arange(0, T + 1, L, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    cuts = sorted(set(torch.randint(1, T, (args.docs - 1,), generator=g).tolist()))
    ragged = torch.tensor([0, *cuts, T], dtype=torch.int32)
    print(f"T={T} H={H} K=V={K} threads={args.threads}; equal: {n} x {L}; ragged: {len(ragged) - 1} documents")
    print(f"{'aggregation':<12}{'unpacked':>10}{'packed eq':>11}{'ratio':>7}{'one seq':>10}{'ragged':>9}{'ratio':>7}")
    for agg in ("none", "grm", "ssc", "mean"):
        t_unp, t_peq, t_one, t_rag = _times([
            _case((n, L), agg, H, K), _case((1, T), agg, H, K, equal), _case((1, T), agg, H, K),
            _case((1, T), agg, H, K, ragged)], args.runs)
        print(f"{agg:<12}{t_unp * 1e3:>9.0f}m{t_peq * 1e3:>10.0f}m{t_peq / t_unp:>7.2f}"
              f"{t_one * 1e3:>9.0f}m{t_rag * 1e3:>8.0f}m{t_rag / t_one:>7.2f}")


if __name__ == "__main__":
    main()
