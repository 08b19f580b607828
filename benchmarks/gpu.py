"""The GPU check (issue 11): the kernel tests on CUDA, then training and decoding speed against the baselines.

Needs one CUDA GPU (sized for an H100/H200: about 5-8 minutes there), torch with CUDA and triton (the `dev`
extra); flash-linear-attention (`fla`, the `gpu` extra) adds the chunk_simple_gla row when it is installed.
Installs nothing, downloads nothing.

1. `pytest -m gpu tests/test_triton.py tests/test_triton_scan.py`: the kernels at realistic sizes against the
   float64 references.
2. Forward + backward in bf16 at B·T = 32K tokens, H = 16, K = V = 128, segments of 256, T in {2K, 8K, 32K}:
   causal SDPA (flash), fla's chunk_simple_gla (if installed), MC-GRM and MC-SSC (top_k 4, linear memory with a
   decay gate) through `mcrnn.ops.memory_caching` on every backend it has (the `backend` argument is looked
   up; without it, the one path there is is timed as "torch"), and the read kernels alone on a pool of the
   same size ("kernel grm", "kernel ssc": `mcrnn.ops.triton`); the base memory alone: `chunk_linear` with a
   decay on each backend ("linear torch", "linear triton": the scan in PyTorch or in `chunk_scan`, float32 inside
   as Memory Caching runs it) and `chunk_scan` called directly on bf16 inputs with a snapshot per segment
   ("kernel scan": the bf16 dots). Median time of `--runs` runs after warm-up (which compiles the kernels) and
   the peak memory above the inputs.
3. Decode at a 64K-token context, batch 1: tokens/s of MC-SSC and MC-GRM (prefilled state, then one token per
   call) and of SDPA reading a KV cache.

    python benchmarks/gpu.py                          # all of it; JSON to results/bench/gpu.json
    python benchmarks/gpu.py --skip-tests --runs 5    # timings only
    python benchmarks/gpu.py --dry-run                # tiny sizes on the CPU (Triton's interpreter), end to end

Every row that fails records its error and the script goes on; rows past the time budget are skipped.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(tokens=32768, lengths=[2048, 8192, 32768], H=16, K=128, segment=256, top_k=4, decode_context=65536,
            decode_steps=64, warmup=2, runs=10)
DRY = dict(tokens=128, lengths=[64, 128], H=2, K=16, segment=32, top_k=2, decode_context=96, decode_steps=3,
           warmup=1, runs=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; on a machine without CUDA: CPU + interpreter")
    p.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu` first")
    p.add_argument("--runs", type=int, default=None, help="timed runs per row (median reported)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the rows that would start after this")
    p.add_argument("--json", default=str(ROOT / "results" / "bench" / "gpu.json"), help="where to write the JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("benchmarks/gpu.py needs a CUDA GPU (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: the kernels run on CPU
    cfg = dict(DRY if args.dry_run else FULL)
    if args.runs:
        cfg["runs"] = args.runs
    device = "cuda" if cuda else "cpu"
    result = {"machine": machine(torch), "settings": dict(cfg, device=device, dry_run=args.dry_run),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "train": [], "decode": []}
    if not args.skip_tests:
        result["tests"] = run_tests()
        print(f"pytest -m gpu: {result['tests']['summary']}")
    deadline = start + args.budget_s
    bench = Bench(torch, device, cfg, deadline)
    for T in cfg["lengths"]:
        result["train"] += bench.train_rows(T)
    result["decode"] = bench.decode_rows()
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"wrote {args.json} ({result['elapsed_s']} s)")
    return 0


def machine(torch) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    for name in ("triton", "fla"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as missing
            info[name] = None
    return info


def run_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_triton.py",
           "tests/test_triton_scan.py"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": "timed out after 300 s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "failures": [ln for ln in lines if ln.startswith("FAILED")]}


class Bench:
    def __init__(self, torch, device, cfg, deadline):
        self.torch, self.device, self.cfg, self.deadline = torch, device, cfg, deadline
        self.dtype = torch.bfloat16
        from mcrnn.ops import memory_caching

        self.memory_caching = memory_caching
        params = inspect.signature(memory_caching).parameters
        self.backends = ["torch", "triton"] if "backend" in params else [None]
        from mcrnn.ops import chunk_linear

        self.chunk_linear = chunk_linear
        linear_params = inspect.signature(chunk_linear).parameters
        self.linear_backends = ["torch", "triton"] if "backend" in linear_params else [None]

    # ------------------------------------------------------------------ timing helpers

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def measure(self, fn) -> dict:
        """Median ms of `fn()` over the timed runs, after the warm-up runs, and the peak memory of one run."""
        torch = self.torch
        for _ in range(self.cfg["warmup"]):
            fn()
        self.sync()
        peak = None
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        runs = self.cfg["runs"]
        for i in range(runs):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
            if i == 0 and times[0] > 1000 and runs > 3:  # a slow path: three runs are enough for its median
                runs = 3
        return {"ms": round(statistics.median(times), 3), "peak_mib": None if peak is None else round(peak, 1)}

    def row(self, name, fn_factory, **meta) -> dict:
        row = {"name": name, **meta}
        if time.perf_counter() > self.deadline:
            row["skipped"] = "time budget"
            return row
        try:
            row.update(self.measure(fn_factory()))
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the check
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        print(f"  {name:<22} T={meta.get('T', '')}: {row.get('ms', row.get('error', row.get('skipped')))}", flush=True)
        return row

    # ------------------------------------------------------------------ training: forward + backward

    def leaves(self, *shape, scale=1.0, normalize=False):
        torch = self.torch
        x = torch.randn(*shape, device=self.device, dtype=torch.float32) * scale
        if normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        return x.to(self.dtype).requires_grad_()

    def train_rows(self, T: int) -> list[dict]:
        c = self.cfg
        B = max(1, c["tokens"] // T)
        meta = dict(T=T, B=B)
        print(f"fwd+bwd bf16, T={T}, B={B}, H={c['H']}, K=V={c['K']}", flush=True)
        rows = [self.row("sdpa", lambda: self.sdpa_case(B, T), **meta)]
        try:
            import fla.ops.simple_gla  # noqa: F401

            rows.append(self.row("fla chunk_simple_gla", lambda: self.fla_case(B, T), **meta))
        except ImportError:
            rows.append({"name": "fla chunk_simple_gla", **meta, "skipped": "fla not installed"})
        for agg in ("grm", "ssc"):
            for backend in self.backends:
                name = f"mc-{agg} {backend or 'torch'}"
                rows.append(self.row(name, lambda a=agg, b=backend: self.mc_case(B, T, a, b), **meta))
        for agg in ("grm", "ssc"):
            rows.append(self.row(f"kernel {agg}", lambda a=agg: self.kernel_case(B, T, a), **meta))
        for backend in self.linear_backends:
            rows.append(self.row(f"linear {backend or 'torch'}", lambda b=backend: self.linear_case(B, T, b), **meta))
        rows.append(self.row("kernel scan", lambda: self.scan_kernel_case(B, T), **meta))
        return rows

    def sdpa_case(self, B, T):
        F = self.torch.nn.functional
        c = self.cfg
        q, k, v = (self.leaves(B, c["H"], T, c["K"]) for _ in range(3))
        d_o = self.torch.randn_like(q)

        def run():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            self.torch.autograd.grad(o, [q, k, v], d_o)

        return run

    def fla_case(self, B, T):
        from fla.ops.simple_gla import chunk_simple_gla

        torch, c = self.torch, self.cfg
        q, k = (self.leaves(B, T, c["H"], c["K"], normalize=True) for _ in range(2))
        v = self.leaves(B, T, c["H"], c["K"])
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, c["H"], device=self.device) + 4).requires_grad_()
        d_o = torch.randn_like(v)

        def run():
            o, _ = chunk_simple_gla(q=q, k=k, v=v, g=g)
            torch.autograd.grad(o, [q, k, v, g], d_o)

        return run

    def mc_case(self, B, T, agg, backend):
        torch, c = self.torch, self.cfg
        q, k = (self.leaves(B, T, c["H"], c["K"], normalize=True) for _ in range(2))
        v, u = (self.leaves(B, T, c["H"], c["K"]) for _ in range(2))
        decay = torch.sigmoid(torch.randn(B, T, c["H"], device=self.device) + 4).to(self.dtype).requires_grad_()
        kw = dict(memory="linear", aggregation=agg, segment_size=c["segment"], gates={"decay": decay})
        if agg == "ssc":
            kw["top_k"] = c["top_k"]
        if backend is not None:
            kw["backend"] = backend
        d_o = torch.randn_like(v)

        def run():
            o, _ = self.memory_caching(q, k, v, u, **kw)
            torch.autograd.grad(o, [q, k, v, u, decay], d_o)

        return run

    def kernel_case(self, B, T, agg):
        """The read kernels alone: tokens [B, H, T, K] against P = T / segment - 1 float32 states."""
        import mcrnn.ops.triton as mt

        torch, c = self.torch, self.cfg
        H, K, C = c["H"], c["K"], c["segment"]
        P = max(1, (T - 1) // C)
        q, u, r, p_on = (self.leaves(B, H, T, K) for _ in range(4))
        pool_p = (torch.randn(B, H, P, K, device=self.device)).requires_grad_()
        pool_S = (torch.randn(B, H, P, K, K, device=self.device) / K**0.5).requires_grad_()
        seg = torch.arange(T, device=self.device) // C
        vis_lo = torch.arange(1, P + 1, device=self.device)
        vis_hi = torch.full((P,), T // C + 1, device=self.device)
        leaves = [q, u, r, p_on, pool_p, pool_S]
        d_o = torch.randn_like(r)
        kw = dict(scale=K**-0.5, score_scale=K**-0.5)

        def run():
            if agg == "ssc":
                o = mt.ssc_cached_read(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, top_k=c["top_k"], **kw)
            else:
                o = mt.cached_read(q, u, r, p_on, pool_p, pool_S, seg, vis_lo, vis_hi, aggregation=agg, **kw)
            torch.autograd.grad(o, leaves, d_o)

        return run

    def linear_case(self, B, T, backend):
        """The base memory alone (what Memory Caching's scan costs): `chunk_linear` with a decay gate."""
        torch, c = self.torch, self.cfg
        q, k = (self.leaves(B, T, c["H"], c["K"], normalize=True) for _ in range(2))
        v = self.leaves(B, T, c["H"], c["K"])
        decay = torch.sigmoid(torch.randn(B, T, c["H"], device=self.device) + 4).to(self.dtype).requires_grad_()
        kw = {} if backend is None else {"backend": backend}
        d_o = torch.randn_like(v)

        def run():
            o, _ = self.chunk_linear(q, k, v, decay=decay, **kw)
            torch.autograd.grad(o, [q, k, v, decay], d_o)

        return run

    def scan_kernel_case(self, B, T):
        """`chunk_scan` on bf16 heads-first inputs (bf16 dots), a snapshot at every segment end, every output's
        gradient flowing back."""
        import mcrnn.ops.triton as mt

        torch, c = self.torch, self.cfg
        H, K, C = c["H"], c["K"], c["segment"]
        q, k = (self.leaves(B, H, T, K, normalize=True) for _ in range(2))
        v = self.leaves(B, H, T, K)
        log_decay = torch.nn.functional.logsigmoid(torch.randn(B, H, T, device=self.device) + 4).requires_grad_()
        positions = list(range(C, T + 1, C))
        d_o = torch.randn_like(v)
        d_snaps = torch.randn(B, H, len(positions), K, K, device=self.device)
        d_final = torch.randn(B, H, K, K, device=self.device)

        def run():
            o, snaps, final = mt.chunk_scan(q, k, v, log_decay, (), None, positions)
            outs, grads = [o, final], [d_o, d_final]
            if snaps is not None:
                outs.append(snaps)
                grads.append(d_snaps)
            torch.autograd.grad(outs, [q, k, v, log_decay], grads)

        return run

    # ------------------------------------------------------------------ decoding

    def decode_rows(self) -> list[dict]:
        c = self.cfg
        L, steps = c["decode_context"], c["decode_steps"]
        print(f"decode, context {L}, batch 1, {steps} tokens", flush=True)
        rows = []
        for agg in ("ssc", "grm"):
            for backend in self.backends:
                name = f"mc-{agg} {backend or 'torch'}"
                rows.append(self.decode_row(name, lambda a=agg, b=backend: self.mc_decoder(a, b)))
        rows.append(self.decode_row("sdpa kv-cache", self.sdpa_decoder))
        return rows

    def decode_row(self, name, make) -> dict:
        c = self.cfg
        row = {"name": name, "context": c["decode_context"], "B": 1}
        if time.perf_counter() > self.deadline:
            row["skipped"] = "time budget"
            return row
        try:
            step = make()
            step(0)  # warm-up (compiles, allocates)
            self.sync()
            t0 = time.perf_counter()
            for i in range(1, c["decode_steps"] + 1):
                step(i)
            self.sync()
            seconds = time.perf_counter() - t0
            row.update(tokens_per_s=round(c["decode_steps"] / seconds, 1),
                       ms_per_token=round(seconds / c["decode_steps"] * 1e3, 3))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        print(f"  {name:<22}: {row.get('tokens_per_s', row.get('error', row.get('skipped')))} tokens/s", flush=True)
        return row

    def mc_decoder(self, agg, backend):
        """Prefill `decode_context` tokens (no grad), then a step is one token through the op."""
        torch, c = self.torch, self.cfg
        H, K, L = c["H"], c["K"], c["decode_context"]
        kw = dict(memory="linear", aggregation=agg, segment_size=c["segment"], output_final_state=True)
        if agg == "ssc":
            kw["top_k"] = c["top_k"]
        if backend is not None:
            kw["backend"] = backend

        def inputs(T):
            q, k = (torch.nn.functional.normalize(torch.randn(1, T, H, K, device=self.device), dim=-1)
                    for _ in range(2))
            v, u = (torch.randn(1, T, H, K, device=self.device) for _ in range(2))
            decay = torch.sigmoid(torch.randn(1, T, H, device=self.device) + 4)
            return [x.to(self.dtype) for x in (q, k, v, u)], {"decay": decay.to(self.dtype)}

        with torch.no_grad():
            (q, k, v, u), gates = inputs(L)
            _, state = self.memory_caching(q, k, v, u, gates=gates, **kw)
        (q, k, v, u), gates = inputs(c["decode_steps"] + 1)
        holder = {"state": state}

        def step(i):
            with torch.no_grad():
                sl = slice(i, i + 1)
                _, holder["state"] = self.memory_caching(q[:, sl], k[:, sl], v[:, sl], u[:, sl],
                                                         gates={"decay": gates["decay"][:, sl]},
                                                         initial_state=holder["state"], **kw)

        return step

    def sdpa_decoder(self):
        torch, c = self.torch, self.cfg
        H, K, L = c["H"], c["K"], c["decode_context"]
        total = L + c["decode_steps"] + 1
        k_cache = torch.randn(1, H, total, K, device=self.device, dtype=self.dtype)
        v_cache = torch.randn(1, H, total, K, device=self.device, dtype=self.dtype)
        new = torch.randn(c["decode_steps"] + 1, 3, 1, H, 1, K, device=self.device, dtype=self.dtype)
        F = torch.nn.functional

        def step(i):
            with torch.no_grad():
                q, k, v = new[i]
                n = L + i
                k_cache[:, :, n : n + 1] = k
                v_cache[:, :, n : n + 1] = v
                F.scaled_dot_product_attention(q, k_cache[:, :, : n + 1], v_cache[:, :, : n + 1])

        return step


def print_tables(result: dict) -> None:
    train = result["train"]
    names = list(dict.fromkeys(r["name"] for r in train))
    lengths = list(dict.fromkeys(r["T"] for r in train))
    cell = lambda r: (f"{r['ms']:.2f} ms" + (f" / {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else "")
                      if "ms" in r else ("error" if "error" in r else "skipped"))
    print("\nforward + backward (bf16), median; peak memory above the inputs")
    print(f"| {'op':<22} | " + " | ".join(f"T={T} (B={next(r['B'] for r in train if r['T'] == T)})" for T in lengths)
          + " |")
    print("|" + "---|" * (len(lengths) + 1))
    for n in names:
        cells = [cell(next((r for r in train if r["name"] == n and r["T"] == T), {})) for T in lengths]
        print(f"| {n:<22} | " + " | ".join(cells) + " |")
    print(f"\ndecode, context {result['settings']['decode_context']}, batch 1")
    print("| op | tokens/s | ms/token |\n|---|---|---|")
    for r in result["decode"]:
        if "tokens_per_s" in r:
            print(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.3f} |")
        else:
            print(f"| {r['name']} | {r.get('error', r.get('skipped'))} | |")
    errors = [r for r in train + result["decode"] if "error" in r]
    for r in errors:
        print(f"error in {r['name']} (T={r.get('T', r.get('context'))}): {r['error']}")


if __name__ == "__main__":
    sys.exit(main())
