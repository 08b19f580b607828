"""Whole-model throughput: training and decoding tokens/s and peak memory vs sequence length.

``mcrnn eval throughput configs/eval/throughput.yaml`` (and ``python benchmarks/model.py``, the same code).
Nothing is trained: every variant of the experiment file is a model config (``base.model`` merged with
``variants.NAME.model``) built with random weights and measured at every length of ``eval.seq_lens``.

Each (variant, length) runs in its own fresh process (forked from a server that imported torch and
transformers once, so a case does not pay ~6 s of imports; its peak RSS is still its own):

1. the model and a random batch ``input_ids: [B, T]`` are built, the process's peak RSS is read;
2. training: forward + backward of the LM loss (``model(ids, labels=ids).loss.backward()``, no optimizer
   step). The first run is the warm-up and the peak-memory run (``peak_mb``: growth of the peak RSS over
   step 1, i.e. the activations, gradients and workspaces of the step); then the median of ``runs`` timed
   runs gives ``train_tokens_per_s = B * T / median``;
3. decoding: a prompt ``[decode_batch, T]`` is prefilled with the cache (``use_cache=True``, timed apart as
   ``prefill_s``), then ``n_decode`` single-token greedy steps continue from the cache; ``decode_tokens_per_s
   = decode_batch / median step time`` is the generation speed at context ``T`` (a KV cache of ``T`` tokens
   for attention; the recurrent state plus ``T / segment_size`` cached states for Memory Caching).

Ratios are computed from the rows of the same run: ``ratio_train_vs_attention`` = train tokens/s of the
row over that of the attention variant at the same length (> 1: faster than attention);
``ratio_train_vs_base`` = over the variant with the same memory and ``aggregation: none`` (the cost of
Memory Caching; 1.0 for the base itself, None for attention). Timings are only comparable within a run.

A case that would take longer than ``eval.max_seconds_per_case`` is skipped, not waited for: the case
estimates its remaining time after the warm-up run and stops if it would overrun, the parent kills it at
the limit in any case, and the longer lengths of that variant are then skipped without running. Skipped
rows keep ``None`` numbers and say why in ``skipped``.

``eval`` settings (defaults in :data:`DEFAULTS`)::

    seq_lens: [256, 1024, 4096]
    batch_size: 1            # B of the training batch ...
    batch_tokens: 4096       # ... or B = max(1, batch_tokens // T): the same tokens per step at every T
    runs: 3                  # timed training runs (median)
    n_decode: 32             # timed decode steps (median)
    decode_batch: 1
    threads: 2               # torch threads per case (the `threads` argument of `run` wins)
    max_seconds_per_case: 120
    model_by_seq_len: {256: {segment_size: 64}}   # model overrides at one length (every variant)
    variants: [attention, linear_grm]             # measure these only (a `quick` section cannot remove
                                                  # variants: its mappings merge into the file's)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .common import (
    RESULTS_NAME,
    Experiment,
    command_line,
    deep_merge,
    git_commit,
    machine,
    write_json,
)

DEFAULTS: dict[str, Any] = {
    "seq_lens": [256, 1024, 4096],
    "batch_size": 1,
    "batch_tokens": None,
    "runs": 3,
    "n_decode": 32,
    "decode_batch": 1,
    "threads": 2,
    "max_seconds_per_case": 120.0,
    "model_by_seq_len": {},
    "variants": None,
}
#: the keys of every row (more keys follow them: segment_size, batch_size, timings, skipped/error)
ROW_KEYS = ("variant", "seq_len", "train_tokens_per_s", "decode_tokens_per_s", "peak_mb", "params",
            "ratio_train_vs_attention", "ratio_train_vs_base")


# --- the cases ---------------------------------------------------------------------------------------------


def eval_spec(exp: Experiment, threads: int | None = None) -> dict:
    """``exp.eval`` over :data:`DEFAULTS` (``threads`` overrides ``eval.threads``); unknown keys are errors."""
    unknown = sorted(set(exp.eval) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"eval.{unknown[0]}: unknown key (known: {', '.join(sorted(DEFAULTS))})")
    spec = {**DEFAULTS, **exp.eval}
    if threads:
        spec["threads"] = threads
    spec["seq_lens"] = [int(t) for t in spec["seq_lens"]]
    spec["model_by_seq_len"] = {int(k): v for k, v in (spec["model_by_seq_len"] or {}).items()}
    missing = [v for v in spec["variants"] or [] if v not in exp.variants]
    if missing:
        raise ValueError(f"eval.variants: unknown variant {missing[0]!r} (known: {', '.join(exp.variants)})")
    return spec


def measured_variants(exp: Experiment, spec: dict) -> list[str]:
    """The variants to measure: ``eval.variants`` if set, else all, in file order."""
    return [v for v in exp.variants if not spec["variants"] or v in spec["variants"]]


def variant_model(exp: Experiment, variant: str, seq_len: int | None = None, spec: dict | None = None) -> dict:
    """The model section of ``variant`` (``base.model`` + ``variants.NAME.model`` + the length's overrides)."""
    model = deep_merge(exp.base.get("model") or {}, (exp.variants[variant] or {}).get("model") or {})
    if seq_len is not None and spec is not None:
        model = deep_merge(model, spec["model_by_seq_len"].get(seq_len) or {})
    return model


def _kind(model: dict) -> tuple[str, str, str]:
    """(mixer, memory, aggregation) with MCConfig's defaults filled in; a hybrid counts as "mc"."""
    mixer = model.get("mixer", "mc")
    if isinstance(mixer, list):
        mixer = "mc" if "mc" in mixer else mixer[0]
    return mixer, model.get("memory", "linear"), model.get("aggregation", "grm")


def batch_size(spec: dict, seq_len: int) -> int:
    """B of the training batch at ``seq_len``: ``batch_tokens // T`` (at least 1) if set, else ``batch_size``."""
    if spec.get("batch_tokens"):
        return max(1, int(spec["batch_tokens"]) // seq_len)
    return int(spec["batch_size"])


def make_cases(exp: Experiment, spec: dict) -> list[dict]:
    """One case per (variant, length), variants in file order, lengths ascending within a variant."""
    cases = []
    for v in measured_variants(exp, spec):
        for T in sorted(spec["seq_lens"]):
            cases.append({"variant": v, "seq_len": T, "model": variant_model(exp, v, T, spec),
                          "batch_size": batch_size(spec, T), "runs": int(spec["runs"]),
                          "n_decode": int(spec["n_decode"]), "decode_batch": int(spec["decode_batch"]),
                          "threads": int(spec["threads"])})
    return cases


# --- one case (in its own process) -------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_case(case: dict, deadline: float | None = None) -> dict:
    """Measure one case in this process (see the module docstring); ``deadline`` is a ``time.time()``.

    Returns ``{"params", "train_tokens_per_s", "train_step_s", "first_step_s", "peak_mb",
    "decode_tokens_per_s", "decode_step_ms", "decode_steps", "prefill_s"}`` or ``{"skipped": reason}``.
    """
    import torch

    from mcrnn.models import MCConfig, MCForCausalLM

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    model_kw = dict(case["model"])
    model_kw.setdefault("vocab_size", 258)  # the byte tokenizer's vocabulary
    T, B = case["seq_len"], case["batch_size"]
    model_kw["max_position_embeddings"] = max(model_kw.get("max_position_embeddings", 0), T + case["n_decode"])
    model = MCForCausalLM(MCConfig(**model_kw))
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_kw["vocab_size"], (B, T), generator=g)
    left = (lambda: deadline - time.time()) if deadline else (lambda: float("inf"))

    def step():
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)  # the next step allocates its gradients again, as training does

    model.train()
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    step()  # warm-up and peak-memory run
    first = time.perf_counter() - t0
    peak = _peak_rss_mb() - before
    # the prefill is a forward pass of about a third of a training step; decoding is cheap next to them
    need = first * (case["runs"] + 0.5 * case["decode_batch"] / B)
    if need > left():
        return {"params": params, "first_step_s": first, "peak_mb": peak,
                "skipped": f"estimated {need:.0f} s more after a {first:.1f} s warm-up step, "
                           f"{max(left(), 0):.0f} s left of max_seconds_per_case"}
    times = []
    for _ in range(case["runs"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    train_s = statistics.median(times)

    model.eval()
    prompt = torch.randint(0, model_kw["vocab_size"], (case["decode_batch"], T), generator=g)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(case["n_decode"]):
            if left() < 0:  # report the steps done so far rather than be killed
                break
            t0 = time.perf_counter()
            out = model(tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
    step_s = statistics.median(steps) if steps else None
    return {"params": params, "train_tokens_per_s": B * T / train_s, "train_step_s": train_s,
            "first_step_s": first, "peak_mb": peak,
            "decode_tokens_per_s": case["decode_batch"] / step_s if step_s else None,
            "decode_step_ms": 1e3 * step_s if step_s else None, "decode_steps": len(steps), "prefill_s": prefill}


def _child(case: dict, deadline: float | None, conn) -> None:
    """Process entry: measure, send the result (or the error) through ``conn``."""
    try:
        res = measure_case(case, deadline)
    except Exception as e:  # noqa: BLE001 - reported as the row's error, the sweep goes on
        res = {"error": f"{type(e).__name__}: {e}"}
    conn.send(res)
    conn.close()


def _noop() -> None:
    pass


_CTX = None


def _context():
    """A forkserver that imported torch and the model once (spawn where there is no fork), started here so
    that its imports are not counted in the first case's time limit."""
    global _CTX
    if _CTX is None:
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "mcrnn.models", "mcrnn.eval.throughput"])
        else:  # pragma: no cover
            ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_noop, daemon=True)
        proc.start()
        proc.join()
        _CTX = ctx
    return _CTX


def run_case(case: dict, max_seconds: float | None) -> dict:
    """``measure_case`` in a fresh process, killed after ``max_seconds`` (then ``{"skipped": ...}``)."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    deadline = time.time() + max_seconds if max_seconds else None
    proc = ctx.Process(target=_child, args=(case, deadline, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()  # only the child writes; recv then sees EOF if it dies
    # a small grace over the deadline: the case checks it itself and reports what it measured
    res = None
    if recv.poll(None if max_seconds is None else max_seconds + 5):
        try:
            res = recv.recv()
        except EOFError:
            res = None
    if res is None and proc.is_alive():
        proc.kill()
        res = {"skipped": f"killed after max_seconds_per_case = {max_seconds:g} s"}
    proc.join(10)
    if res is None:
        res = {"error": f"the case's process died (exit code {proc.exitcode}; out of memory?)"}
    res["wall_s"] = time.perf_counter() - t0
    return res


# --- the sweep ---------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict], models: dict[str, dict]) -> None:
    """Fill ``ratio_train_vs_attention`` and ``ratio_train_vs_base`` in place (``models``: variant -> model
    section). The base of an MC variant is the first variant with the same memory and aggregation none."""
    kinds = {v: _kind(m) for v, m in models.items()}
    attention = next((v for v, k in kinds.items() if k[0] == "attention"), None)
    base_of = {}
    for v, (mixer, memory, _) in kinds.items():
        if mixer != "attention":
            base_of[v] = next((b for b, k in kinds.items() if k[0] != "attention" and k[1] == memory
                               and k[2] == "none"), None)
    speed = {(r["variant"], r["seq_len"]): r.get("train_tokens_per_s") for r in rows}

    def ratio(row, ref):
        a, b = row.get("train_tokens_per_s"), speed.get((ref, row["seq_len"])) if ref else None
        return a / b if a and b else None

    for r in rows:
        r["ratio_train_vs_attention"] = ratio(r, attention)
        r["ratio_train_vs_base"] = ratio(r, base_of.get(r["variant"]))


def _row(case: dict, res: dict) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(variant=case["variant"], seq_len=case["seq_len"], params=res.get("params"))
    for k in ("train_tokens_per_s", "decode_tokens_per_s", "peak_mb"):
        row[k] = res.get(k)
    row.update(segment_size=case["model"].get("segment_size"), batch_size=case["batch_size"])
    row.update({k: v for k, v in res.items() if k not in row})
    return row


def _log_row(row: dict, log: Callable[[str], None]) -> None:
    head = f"[throughput] {row['variant']} T={row['seq_len']}:"
    if row.get("skipped") or row.get("error"):
        log(f"{head} {'skipped' if row.get('skipped') else 'error'}: {row.get('skipped') or row.get('error')}")
        return
    dec = row["decode_tokens_per_s"]
    log(f"{head} train {row['train_tokens_per_s']:.0f} tok/s, decode "
        f"{'-' if dec is None else f'{dec:.0f}'} tok/s, peak {row['peak_mb']:.0f} MB ({row['wall_s']:.1f} s)")


def _variant_rows(cases: list[dict], max_seconds: float | None, log: Callable[[str], None]) -> list[dict]:
    """The cases of one variant, lengths ascending; after a skipped length, the longer ones are not run."""
    rows, stop = [], None
    for case in cases:
        res = ({"skipped": f"T={stop} already exceeded max_seconds_per_case"} if stop is not None
               else run_case(case, max_seconds))
        if res.get("skipped") and stop is None:
            stop = case["seq_len"]
        row = _row(case, res)
        _log_row(row, log)
        rows.append(row)
    return rows


def measure(exp: Experiment, jobs: int = 1, threads: int | None = None,
            log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """Measure every (variant, length) of ``exp``; returns the results dict (rows in variant, length order).

    ``jobs > 1`` measures that many variants at once: faster, but the cases then share the cores, so only
    use it where the cores outnumber ``jobs x threads``.
    """
    spec = eval_spec(exp, threads)
    t0 = time.perf_counter()
    cases = make_cases(exp, spec)
    names = measured_variants(exp, spec)
    groups = [[c for c in cases if c["variant"] == v] for v in names]
    max_s = spec.get("max_seconds_per_case")
    max_s = float(max_s) if max_s else None
    if jobs > 1 and len(groups) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the case processes
            per_variant = list(pool.map(lambda g: _variant_rows(g, max_s, log), groups))
    else:
        per_variant = [_variant_rows(g, max_s, log) for g in groups]
    rows = [r for g in per_variant for r in g]
    add_ratios(rows, {v: variant_model(exp, v) for v in names})
    return {"task": exp.task, "description": exp.description, "command": command_line(),
            "experiment": exp.path, "quick": exp.quick, "commit": git_commit(), "machine": machine(),
            "jobs": jobs, "threads": spec["threads"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": time.perf_counter() - t0, "eval": spec, "config": exp.raw, "rows": rows}


def run(exp: Experiment, out: str | Path, jobs: int = 1, threads: int | None = None) -> dict:
    """The ``throughput`` task: :func:`measure`, then write ``OUT/results.json`` and print the table."""
    result = measure(exp, jobs=jobs, threads=threads)
    write_json(Path(out) / RESULTS_NAME, result)
    print(format_table(result["rows"]), flush=True)
    return result


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows, grouped by length."""
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lines = ["| T | variant | params | train tok/s | x attention | x base | decode tok/s | peak MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["seq_len"]):  # stable: variant order kept within a length
        if r.get("skipped") or r.get("error"):
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
            lines.append(f"| {r['seq_len']} | {r['variant']} | {fmt(r.get('params'), ',')} | {why} | | | | |")
            continue
        lines.append(f"| {r['seq_len']} | {r['variant']} | {fmt(r['params'], ',')} | "
                     f"{fmt(r['train_tokens_per_s'], ',.0f')} | {fmt(r['ratio_train_vs_attention'], '.2f')} | "
                     f"{fmt(r['ratio_train_vs_base'], '.2f')} | {fmt(r['decode_tokens_per_s'], ',.1f')} | "
                     f"{fmt(r['peak_mb'], '.0f')} |")
    return "\n".join(lines)


# --- command line (benchmarks/model.py) --------------------------------------------------------------------


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "eval" / "throughput.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/model.py [--quick] [--seq-lens ...] [--json PATH]``: measure and print the table."""
    from .common import load_experiment

    p = argparse.ArgumentParser(prog="benchmarks/model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment file (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="apply the file's quick section")
    p.add_argument("--seq-lens", type=int, nargs="+", help="override eval.seq_lens")
    p.add_argument("--only", nargs="+", help="these variants only")
    p.add_argument("--runs", type=int, help="override eval.runs")
    p.add_argument("--threads", type=int, help="torch threads per case (default: eval.threads)")
    p.add_argument("--jobs", type=int, default=1, help="variants measured at once (default 1)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    ev = {k: v for k, v in (("seq_lens", args.seq_lens), ("runs", args.runs)) if v is not None}
    exp = load_experiment(args.config, "throughput", quick=args.quick, overrides={"eval": ev} if ev else None,
                          only=args.only)
    result = measure(exp, jobs=args.jobs, threads=args.threads)
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} CPUs visible, torch {m['torch']}; threads {result['threads']}; "
          f"commit {result['commit']}; {result['wall_seconds']:.0f} s")
    print(format_table(result["rows"]))
    if args.json:
        print(f"written: {write_json(args.json, result)}")
    return 0

