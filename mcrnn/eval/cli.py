"""``mcrnn eval``: run one experiment file, or the whole sweep behind docs/results.md.

    mcrnn eval TASK CONFIG.yaml [--quick] [--out DIR] [--jobs N] [--threads N] [--only V1,V2] [--retrain]
                                [--dotted.path=value ...]
    mcrnn eval all [--suite cpu|gpu] [--quick] [--jobs N] [--threads N] [--root DIR]
    mcrnn eval lm|niah [CONFIG.yaml] --model PATH [--mc.key=value ...] [--quick] [--out DIR] [--device D]

``--dotted.path=value`` overrides any entry of the experiment file, read as YAML
(``--base.train.steps=500``, ``--eval.num_examples=64``, ``--seeds=[0]``). On a GPU, the same files run with
a bigger model and data: ``--base.model.hidden_size=512 --base.data.seq_len=2048 --base.train.device=cuda``.

``--model PATH`` measures a transformers checkpoint directory (``save_pretrained``; a plain Mamba-2 or one saved
with Memory Caching) instead of training: variant ``no_mc`` (the backbone alone) and ``mc`` (its saved MC
settings, or for a plain checkpoint the ``--mc.key=value`` settings, e.g. ``--mc.aggregation=mean
--mc.segment_size=256 --mc.init=independent``). CONFIG defaults to ``configs/pretrained/TASK.yaml`` (the data,
the length ``L`` and the task's eval settings); output goes to ``results/pretrained/<stem>/<model dir name>``
(``<run>-pretrained`` for a training run's ``OUT_DIR/pretrained``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mcrnn.train.config import split_overrides

#: the full sweep, in order: (task, experiment file); `mcrnn report` reads what it writes
SWEEP = [
    ("mqar", "configs/eval/mqar.yaml"),
    ("mqar", "configs/eval/mqar_deep.yaml"),
    ("mqar", "configs/eval/mqar_width.yaml"),
    ("mqar", "configs/eval/ablations.yaml"),
    ("niah", "configs/eval/niah.yaml"),
    ("lm", "configs/eval/lm.yaml"),
    ("throughput", "configs/eval/throughput.yaml"),
]
#: the same experiments at Zoology's scale for one H100/H200 (`mcrnn eval all --suite gpu`)
GPU_SWEEP = [
    ("mqar", "configs/eval/gpu/mqar.yaml"),
    ("niah", "configs/eval/gpu/niah.yaml"),
    ("lm", "configs/eval/gpu/lm.yaml"),
]
SUITES = {"cpu": (SWEEP, "results/eval"), "gpu": (GPU_SWEEP, "results/eval_gpu")}


def parse_dotted(args: list[str]) -> dict:
    """``["--base.train.steps=5", "--seeds", "[0]"]`` -> ``{"base": {"train": {"steps": 5}}, "seeds": [0]}``."""
    out: dict = {}
    for arg, keys, value in split_overrides(args, "--dotted.path=value"):
        if not all(keys):
            raise ValueError(f"override {arg!r}: empty key in {'.'.join(keys)!r}")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {arg!r}: {k!r} is set twice")
        node[keys[-1]] = value
    return out


def repo_path(rel: str) -> Path:
    """An experiment file of the sweep: relative to the working directory, else to the source checkout."""
    p = Path(rel)
    if p.exists():
        return p
    alt = Path(__file__).resolve().parents[2] / rel
    return alt if alt.exists() else p


def main(argv: list[str] | None = None) -> int:
    from mcrnn.eval import TASKS, run_task

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="mcrnn eval", description="Run an evaluation task or the full sweep.",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("task", help=f"one of {', '.join(TASKS)}, or 'all' for the sweep")
    p.add_argument("config", nargs="?", help="experiment file (configs/eval/*.yaml); not with 'all'")
    p.add_argument("--quick", action="store_true", help="apply the file's `quick` section (a smoke run)")
    p.add_argument("--out", default=None, help="output directory (default results/eval/<stem>/<full|quick>)")
    p.add_argument("--root", default=None,
                   help="with 'all': where each experiment writes (default results/eval, gpu: results/eval_gpu)")
    p.add_argument("--suite", default="cpu", choices=sorted(SUITES),
                   help="with 'all': the CPU sweep or its GPU-scale version (configs/eval/gpu/)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (worker processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job")
    p.add_argument("--only", default=None, help="comma-separated variants to run")
    p.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="measure this transformers checkpoint directory (lm, niah), with and without MC")
    p.add_argument("--device", default="auto", help="with --model: cpu, cuda or auto")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = parse_dotted(rest)
    except ValueError as e:
        print(f"mcrnn eval: {e}", file=sys.stderr)
        return 2
    mc = overrides.pop("mc", None)
    if args.model is not None or mc is not None:
        return _eval_checkpoint(args, overrides, mc)
    if args.jobs < 1:
        print("mcrnn eval: --jobs must be >= 1", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else None
    if args.task == "all":
        if args.config is not None:
            print("mcrnn eval all: takes no CONFIG (it runs every file of the sweep)", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        sweep, default_root = SUITES[args.suite]
        args.root = args.root or default_root
        for task, rel in sweep:
            cfg = repo_path(rel)
            out = Path(args.root) / cfg.stem / ("quick" if args.quick else "full")
            t1 = time.perf_counter()
            print(f"=== {task}: {rel} -> {out}", flush=True)
            run_task(task, cfg, out=out, quick=args.quick, jobs=args.jobs, threads=args.threads,
                     overrides=overrides or None, retrain=args.retrain)
            print(f"=== {rel}: {time.perf_counter() - t1:.0f} s", flush=True)
        out_md = "docs/results.md" if args.suite == "cpu" else "docs/results_gpu.md"
        print(f"sweep done in {time.perf_counter() - t0:.0f} s; build the report with `mcrnn report --collect "
              f"{args.root} --out {out_md}`" if args.suite == "cpu" else
              f"sweep done in {time.perf_counter() - t0:.0f} s; build its report with `mcrnn report {args.root} "
              f"--out {out_md}`", flush=True)
        return 0
    if args.task not in TASKS:
        print(f"mcrnn eval: unknown task {args.task!r} (choose one of {', '.join(TASKS)} or all)", file=sys.stderr)
        return 2
    if args.config is None:
        print("mcrnn eval: CONFIG.yaml is required (see configs/eval/)", file=sys.stderr)
        return 2
    try:
        res = run_task(args.task, args.config, out=args.out, quick=args.quick, jobs=args.jobs,
                       threads=args.threads, overrides=overrides or None, only=only, retrain=args.retrain)
    except (ValueError, FileNotFoundError) as e:
        print(f"mcrnn eval: {e}", file=sys.stderr)
        return 2
    print(f"{len(res.get('runs', []))} runs in {res.get('wall_seconds', 0):.0f} s")
    return 0


def _eval_checkpoint(args, overrides: dict, mc: dict | None) -> int:
    """``mcrnn eval lm|niah [CONFIG] --model PATH [--mc.key=value ...]``."""
    from mcrnn.eval import task_module
    from mcrnn.eval.common import MODEL_TASKS, load_experiment, run_checkpoint

    if args.model is None:
        print("mcrnn eval: --mc.* settings need --model PATH (a transformers checkpoint directory)", file=sys.stderr)
        return 2
    if args.task not in MODEL_TASKS:
        print(f"mcrnn eval: --model works with the tasks {', '.join(MODEL_TASKS)}, not {args.task!r}",
              file=sys.stderr)
        return 2
    config = args.config or repo_path(f"configs/pretrained/{args.task}.yaml")
    model_dir = Path(args.model).resolve()
    # a training run's result is OUT_DIR/pretrained: name it after its run
    name = f"{model_dir.parent.name}-{model_dir.name}" if model_dir.name == "pretrained" else model_dir.name
    out = args.out or Path("results/pretrained") / Path(config).stem / name
    only = args.only.split(",") if args.only else None
    try:
        exp = load_experiment(config, args.task, quick=args.quick, overrides=overrides or None)
        res = run_checkpoint(exp, task_module(args.task).evaluate, out, args.model, mc=mc, only=only,
                             device=args.device, threads=args.threads)
    except (ValueError, FileNotFoundError) as e:
        print(f"mcrnn eval: {e}", file=sys.stderr)
        return 2
    for rec in res["runs"]:
        print(f"{rec['variant']}: " + _summary(args.task, rec["rows"]))
    print(f"{len(res['runs'])} runs in {res['wall_seconds']:.0f} s; rows in {Path(out) / 'results.json'}")
    return 0


def _summary(task: str, rows: list[dict]) -> str:
    """One line per variant: perplexity vs length (lm) or exact match per length (niah)."""
    if task == "lm":
        ppl = [r for r in rows if r["metric"] == "ppl_extrapolation"]
        if not ppl:
            ppl = [r for r in rows if r["metric"] == "ppl"]
        return "ppl " + ", ".join(f"{r['seq_len']}: {r['value']:.3f}" for r in ppl)
    by_len: dict[int, list[float]] = {}
    for r in rows:
        by_len.setdefault(r["seq_len"], []).append(r["accuracy"])
    return "exact match " + ", ".join(f"{L}: {sum(a) / len(a):.3f}" for L, a in sorted(by_len.items()))


if __name__ == "__main__":
    sys.exit(main())
