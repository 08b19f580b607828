"""The experiment runner shared by the evaluation tasks: train (or reuse) every variant x seed, evaluate, write JSON.

An *experiment file* (``configs/eval/*.yaml``) is a training config plus what to vary and what to measure::

    task: mqar                 # the task module that evaluates the runs (checked against the CLI's TASK)
    base:                      # a training config, exactly as for `mcrnn train` (sections model/data/train)
      model: {...}
      data: {...}
      train: {...}
    variants:                  # run name -> overrides of `base` (section by section, as --section.key=value)
      attention: {model: {mixer: attention}}
      grm: {model: {aggregation: grm}}
    seeds: [0, 1, 2]           # every variant is trained once per seed (train.seed)
    eval: {...}                # the task's own evaluation settings
    tune:                      # optional: every variant gets its own learning rate
      lr: [1.0e-3, 3.0e-3]     #   train.lr candidates, one run each per variant at the tuning seed
      seed: 100                #   the tuning seed (keep it out of `seeds`: the reported runs are fresh)
      metric: eval_loss        #   the trainer's final held-out metric (eval_loss: lower wins, eval_acc: higher)
    quick: {...}               # overrides of this whole file applied by --quick (same layout, merged deeply)

With ``tune``, the candidates train first into ``OUT/tune/v/lr<value>/``; each variant's seeds then train with
the candidate whose final held-out metric is best (ties: the first listed), and ``results.json`` records every
candidate's metric under ``tuned``.

Run ``r`` of variant ``v`` and seed ``s`` trains into ``OUT/runs/v/seed{s}/`` (the trainer's usual files). A
run whose checkpoint already holds the finished schedule of the same model/data/train sections is reused,
so an interrupted sweep restarts where it stopped. A reused run is not measured again either when its
``eval.json`` was written with the same ``eval`` section for the same checkpoint (delete that file, or pass
``--retrain``, to measure it again).
Each finished run's record (params, training time, the task's rows) is written to ``OUT/runs/v/seed{s}/
eval.json`` and all of them to ``OUT/results.json`` together with the command, the experiment file, the git
commit, the machine and the wall time: every number a report quotes can be traced to what produced it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mcrnn.train.config import Config, validate

RESULTS_NAME = "results.json"
_TOP_KEYS = {"task", "base", "variants", "seeds", "eval", "quick", "description", "tune"}
TUNE_METRICS = {"eval_loss": min, "eval_acc": max}


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` recursively (mappings merge, anything else replaces); a new object."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


@dataclass
class Experiment:
    """A parsed experiment file (see the module docstring)."""

    task: str
    base: dict
    variants: dict[str, dict]
    seeds: list[int]
    eval: dict
    path: str | None = None
    description: str = ""
    quick: bool = False
    raw: dict = field(default_factory=dict)
    tune: dict | None = None

    def run_config(self, variant: str, seed: int, out: str | Path, lr: float | None = None,
                   out_dir: str | Path | None = None) -> Config:
        """The checked training config of one run (``train.seed`` = seed, ``train.out_dir`` under ``out``, or
        ``out_dir``; ``lr`` replaces the variant's learning rate)."""
        raw = deep_merge(self.base, self.variants[variant])
        raw = deep_merge(raw, {"train": {"seed": seed, "out_dir": str(out_dir or run_dir(out, variant, seed)),
                                         "progress": False, **({"lr": lr} if lr is not None else {})}})
        try:
            return validate(raw)
        except ValueError as e:
            raise ValueError(f"variants.{variant}: {e}") from e

    def runs(self) -> list[tuple[str, int]]:
        return [(v, s) for v in self.variants for s in self.seeds]


def run_dir(out: str | Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed{seed}"


def load_experiment(path: str | Path, task: str | None = None, quick: bool = False,
                    overrides: dict | None = None, only: list[str] | None = None) -> Experiment:
    """Read and check an experiment file; ``quick`` applies its ``quick`` section, ``overrides`` (a nested
    dict, e.g. ``{"base": {"train": {"steps": 10}}}``) come last; ``only`` keeps those variants."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with keys task/base/variants/seeds/eval")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    if quick and raw.get("quick"):
        raw = deep_merge({k: v for k, v in raw.items() if k != "quick"}, raw["quick"])
    if overrides:
        raw = deep_merge(raw, overrides)
    if task is not None and raw.get("task") != task:
        raise ValueError(f"{path}: task is {raw.get('task')!r}, not {task!r}; pass the matching TASK or file")
    variants = raw.get("variants") or {"default": {}}
    if not isinstance(variants, dict):
        raise ValueError(f"{path}: variants must map run names to overrides")
    variants = {str(k): (v or {}) for k, v in variants.items()}
    if only:
        missing = [v for v in only if v not in variants]
        if missing:
            raise ValueError(f"--only: unknown variant {missing[0]!r} (known: {', '.join(variants)})")
        variants = {k: v for k, v in variants.items() if k in only}
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    exp = Experiment(task=raw.get("task", task or ""), base=raw.get("base") or {}, variants=variants,
                     seeds=list(seeds), eval=raw.get("eval") or {}, path=str(path),
                     description=raw.get("description", ""), quick=quick, raw=raw,
                     tune=_check_tune(raw.get("tune"), seeds, path))
    for v in exp.variants:  # fail in milliseconds on a bad variant, not after the first run trains
        exp.run_config(v, exp.seeds[0], "/nonexistent")
    return exp


def _check_tune(tune: dict | None, seeds: list[int], path) -> dict | None:
    if tune is None:
        return None
    if not isinstance(tune, dict) or set(tune) - {"lr", "seed", "metric"}:
        raise ValueError(f"{path}: tune must be a mapping with keys lr, seed, metric, got {tune!r}")
    lrs = tune.get("lr")
    if not isinstance(lrs, list) or not lrs or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
        raise ValueError(f"{path}: tune.lr must be a non-empty list of positive learning rates, got {lrs!r}")
    seed = tune.get("seed", 100)
    if not isinstance(seed, int) or seed < 0 or seed in seeds:
        raise ValueError(f"{path}: tune.seed must be an integer >= 0 outside seeds {seeds}, got {seed!r}")
    metric = tune.get("metric", "eval_loss")
    if metric not in TUNE_METRICS:
        raise ValueError(f"{path}: tune.metric must be one of {list(TUNE_METRICS)}, got {metric!r}")
    return {"lr": [float(x) for x in lrs], "seed": seed, "metric": metric}


def tune_dir(out: str | Path, variant: str, lr: float) -> Path:
    return Path(out) / "tune" / variant / f"lr{lr:g}"


def final_metric(out_dir: str | Path, metric: str) -> float:
    """The last held-out ``metric`` the trainer logged in ``out_dir/metrics.jsonl`` (NaN when it never did or
    the value was not finite: such a candidate never wins)."""
    value = float("nan")
    path = Path(out_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if metric in rec:
                value = float(rec[metric])
    return value


def _tune_one(args) -> float:
    exp, variant, lr, out, threads, retrain = args
    if threads:
        torch.set_num_threads(threads)
    cfg = exp.run_config(variant, exp.tune["seed"], out, lr=lr, out_dir=tune_dir(out, variant, lr))
    train_or_load(cfg, retrain=retrain)
    value = final_metric(cfg.train.out_dir, exp.tune["metric"])
    print(f"[{exp.task}] tune {variant} lr={lr:g}: {exp.tune['metric']} {value:.4f}", flush=True)
    return value


def tune_learning_rates(exp: Experiment, out: str | Path, jobs: int = 1, threads: int | None = None,
                        retrain: bool = False) -> dict[str, dict]:
    """``{variant: {"lr": best, "candidates": {lr: metric}}}``: one run per variant and candidate at the tuning
    seed, the best final held-out metric wins (see the module docstring)."""
    work = [(exp, v, lr, str(out), threads, retrain) for v in exp.variants for lr in exp.tune["lr"]]
    values = _map(_tune_one, work, jobs)
    pick = TUNE_METRICS[exp.tune["metric"]]
    out_: dict = {}
    for (_, v, lr, *_rest), value in zip(work, values, strict=True):
        out_.setdefault(v, {"candidates": {}})["candidates"][f"{lr:g}"] = value
    for v, rec in out_.items():
        finite = [(float(k), x) for k, x in rec["candidates"].items() if x == x and abs(x) != float("inf")]
        if not finite:
            raise ValueError(f"tune: every learning rate of variant {v!r} diverged ({rec['candidates']})")
        best = pick(finite, key=lambda kv: kv[1])
        rec["lr"] = best[0]
    return out_


def _map(fn, work: list, jobs: int) -> list:
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(fn, work))
    return [fn(w) for w in work]


def _finished(cfg: Config) -> bool:
    """Whether ``cfg.train.out_dir`` holds a checkpoint at the end of the same schedule."""
    path = Path(cfg.train.out_dir) / "ckpt.pt"
    if not path.exists():
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    want = cfg.to_dict()
    try:  # checked again, so that a field added since (with its default) does not count as a change
        have = validate(ckpt["config"]).to_dict()
    except ValueError:
        return False
    same = all(have.get(s) == want.get(s) for s in ("model", "data", "memory_caching")) and all(
        have["train"].get(k) == v for k, v in want["train"].items() if k not in ("out_dir", "progress", "threads"))
    return same and ckpt["step"] >= cfg.train.steps


def load_model(run: str | Path, device: str | torch.device = "cpu"):
    """The model of a trained run directory (``ckpt.pt``), in eval mode, and its :class:`Config`.

    A run that started from a pretrained checkpoint (``train.init_from``) is rebuilt from it (with its
    ``memory_caching`` settings), then gets the trained weights of ``ckpt.pt``.
    """
    from mcrnn.train.trainer import build_run_model, load_checkpoint

    ckpt = load_checkpoint(Path(run) / "ckpt.pt")
    cfg = validate(ckpt["config"])
    vocab = cfg.model.get("vocab_size") or _data_vocab(cfg)
    model = build_run_model(cfg, vocab)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def _data_vocab(cfg: Config) -> int:
    from mcrnn.train.data import make_batches

    return make_batches(cfg.data, cfg.train.seed).vocab_size


def train_or_load(cfg: Config, retrain: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train ``cfg`` unless its out_dir already holds the finished run; returns ``(model, info)`` with
    ``info = {"params", "train_seconds", "reused"}``."""
    from mcrnn.train import train
    from mcrnn.train.trainer import load_checkpoint

    reused = not retrain and _finished(cfg)
    if not reused:
        train(cfg)
    model, _ = load_model(cfg.train.out_dir)
    ckpt = load_checkpoint(Path(cfg.train.out_dir) / "ckpt.pt")
    info = {"params": sum(p.numel() for p in model.parameters()),
            "train_seconds": float(ckpt.get("train_seconds", 0.0)), "reused": reused}
    return model, info


def state_counts(model_cfg: dict, seq_len: int) -> dict[str, int]:
    """Floats a model keeps to process the next token after ``seq_len`` tokens, summed over layers and heads
    (one sequence), by kind: ``kv`` (attention's KV cache), ``memory`` (a recurrent memory's matrices: the
    online state, plus with Memory Caching every cached state) and ``summaries`` (the key sums that scored
    aggregations keep per segment, online and cached). The short convolutions' few-token windows are left out.
    """
    from mcrnn.models import MCConfig

    c = MCConfig(**{k: v for k, v in model_cfg.items()})
    spec = c.mc_spec
    H, K, V = c.num_heads, c.head_dim, c.head_v_dim
    numel = spec.mem.state_numel(K, V, memory_depth=c.memory_depth, expansion=c.expansion)
    caches = 0
    if spec.agg.reads_caches and seq_len > spec.segment_size:
        if spec.segmentation == "logarithmic":
            caches = max(bin(seq_len // spec.segment_size).count("1"), 1)
        else:
            caches = (seq_len - 1) // spec.segment_size
    summary_dim = 1 if spec.cache_scores == "input" else K
    out = {"memory": 0, "summaries": 0, "kv": 0}
    for mixer in c.layer_mixers:
        if mixer == "attention":
            out["kv"] += 2 * seq_len * H * K
            continue
        # the online memory in full (e.g. Titans' momentum too), the caches only what a read needs
        out["memory"] += H * (numel["state"] + caches * numel["cache"])
        if spec.scored:
            out["summaries"] += H * summary_dim * (1 + caches)
    return out


def state_floats(model_cfg: dict, seq_len: int) -> int:
    """All the floats of :func:`state_counts` (KV cache, memories and summaries) in one number."""
    return sum(state_counts(model_cfg, seq_len).values())


def machine() -> dict:
    """Where a result was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": dev, "torch": torch.__version__,
            "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command that is running, as a user would retype it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "mcrnn")):
        argv = ["mcrnn"] + argv[1:]
    return " ".join(shlex.quote(a) for a in argv)


Evaluator = Callable[[torch.nn.Module, Config, dict, str], list[dict]]


def _one_run(args) -> dict:
    """One variant x seed: train or reuse, then evaluate (runs in a worker process with ``--jobs``)."""
    exp, variant, seed, out, evaluate, threads, retrain, lr = args
    if threads:
        torch.set_num_threads(threads)
    cfg = exp.run_config(variant, seed, out, lr=lr)
    t0 = time.perf_counter()
    model, info = train_or_load(cfg, retrain=retrain)
    t1 = time.perf_counter()
    path = Path(cfg.train.out_dir) / "eval.json"
    if info["reused"]:
        old = json.loads(path.read_text()) if path.exists() else {}
        same_ckpt = all(old.get(k) == info[k] for k in ("params", "train_seconds"))
        if same_ckpt and old.get("eval") == exp.eval and old.get("model") == cfg.model:
            print(f"[{exp.task}] {variant} seed {seed}: reused with its evaluation", flush=True)
            return {**old, "reused": True}
    torch.manual_seed(seed)
    rows = evaluate(model, cfg, exp.eval, variant)
    # the state census knows mcrnn's own models only
    state = state_counts(cfg.model, cfg.data.seq_len) if cfg.train.init_from is None else {}
    rec = {"variant": variant, "seed": seed, **info, "state_floats": sum(state.values()), "state": state,
           "model": cfg.model, "train_seq_len": cfg.data.seq_len, "train_steps": cfg.train.steps,
           "lr": cfg.train.lr, "eval": exp.eval,
           "wall_train_s": t1 - t0, "wall_eval_s": time.perf_counter() - t1, "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
    print(f"[{exp.task}] {variant} seed {seed}: {'reused' if info['reused'] else 'trained'} "
          f"({info['train_seconds']:.0f} s), evaluated in {rec['wall_eval_s']:.0f} s", flush=True)
    return rec


def run_experiment(exp: Experiment, evaluate: Evaluator, out: str | Path, jobs: int = 1,
                   threads: int | None = None, retrain: bool = False) -> dict:
    """Train/reuse and evaluate every run of ``exp``; write and return ``OUT/results.json``.

    ``jobs > 1`` runs that many runs at once in worker processes (each with ``threads`` torch threads):
    on a CPU, small models use cores better as parallel jobs than as threads of one job. ``evaluate`` must
    be a module-level function (it is sent to the workers).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tuned = tune_learning_rates(exp, out, jobs, threads, retrain) if exp.tune else {}
    work = [(exp, v, s, str(out), evaluate, threads, retrain, tuned.get(v, {}).get("lr")) for v, s in exp.runs()]
    records = _map(_one_run, work, jobs)
    result = {"task": exp.task, "description": exp.description, "command": command_line(),
              "experiment": exp.path, "quick": exp.quick, "commit": git_commit(), "machine": machine(),
              "jobs": jobs, "threads": threads or torch.get_num_threads(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": time.perf_counter() - t0,
              "config": exp.raw, "runs": records,
              **({"tuned": tuned, "tune": exp.tune} if exp.tune else {})}
    write_json(out / RESULTS_NAME, result)
    return result


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (a crash never leaves half a results file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n == 1:
        return m, 0.0
    return m, (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error, ``std / sqrt(n)`` with the sample standard deviation (0 for one value)."""
    m, s = mean_std(xs)
    return m, (s / len(xs) ** 0.5 if xs else float("nan"))


# --- a pretrained transformers checkpoint (`mcrnn eval lm|niah --model PATH`) -----------------------------------

#: the tasks that can measure a checkpoint as it is (the others train their models)
MODEL_TASKS = ("lm", "niah")


def checkpoint_variants(path: str | Path, mc: dict | None) -> dict[str, dict | None]:
    """What ``--model PATH`` measures: variant name -> Memory Caching settings (None: without MC).

    ``no_mc`` is the backbone alone. ``mc`` is the checkpoint with its saved MC settings (and trained
    ``u_proj``) if it has some, else with the ``--mc.*`` settings if given. ``--mc.*`` on a checkpoint saved
    with MC is a ValueError: it is measured with the settings its ``u_proj`` was trained for.
    """
    from mcrnn.pretrained.loading import checkpoint_config, settings_from
    from mcrnn.pretrained.settings import CONFIG_KEY

    config = checkpoint_config(path, "--model")
    saved = getattr(config, CONFIG_KEY, None)
    settings = settings_from(mc, "--mc") if mc is not None else None
    if saved is not None:
        if settings is not None:
            raise ValueError(f"--mc: {path} was saved with Memory Caching {saved}; it is measured with those "
                             "settings (mc) and without MC (no_mc). Drop --mc, or point --model at the plain "
                             "checkpoint to try other settings")
        return {"no_mc": None, "mc": dict(saved)}
    out: dict[str, dict | None] = {"no_mc": None}
    if settings is not None:
        out["mc"] = settings.to_dict()
    return out


def run_checkpoint(exp: Experiment, evaluate: Evaluator, out: str | Path, model_path: str | Path,
                   mc: dict | None = None, only: list[str] | None = None, device: str = "auto",
                   threads: int | None = None) -> dict:
    """Measure a transformers checkpoint directory with and without Memory Caching; write ``OUT/results.json``.

    The experiment file gives the data (``base.data``: corpus, tokenizer, the length ``L``), the seed
    (``seeds``) and the task's ``eval`` settings; its ``base.model``, ``memory_caching`` and ``variants`` are
    not read (the checkpoint is the model). The variants are :func:`checkpoint_variants`; ``only`` keeps some.
    Every record has the rows of the task plus ``model_path``, ``memory_caching`` and ``params``.
    """
    from mcrnn.pretrained.loading import check_vocab, load_checkpoint_model
    from mcrnn.pretrained.settings import MCSettings

    if exp.task not in MODEL_TASKS:
        raise ValueError(f"--model: the {exp.task} task trains its own models; --model works with "
                         f"{', '.join(MODEL_TASKS)}")
    if threads:
        torch.set_num_threads(threads)
    variants = checkpoint_variants(model_path, mc)
    if only:
        missing = [v for v in only if v not in variants]
        if missing:
            raise ValueError(f"--only: unknown variant {missing[0]!r} (with --model {model_path}: "
                             f"{', '.join(variants)})")
        variants = {k: v for k, v in variants.items() if k in only}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = []
    for seed in exp.seeds:
        raw = {k: v for k, v in exp.base.items() if k not in ("model", "memory_caching")}
        raw = deep_merge(raw, {"train": {"seed": seed, "out_dir": str(out), "progress": False}})
        cfg = validate(raw)
        vocab = _data_vocab(cfg)
        for variant, settings in variants.items():
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            model = load_checkpoint_model(model_path, MCSettings.from_dict(settings) if settings else None,
                                          without_mc=settings is None, field="--model", mc_field="--mc")
            check_vocab(model, vocab, "data.tokenizer", cfg.data.tokenizer if cfg.data.task == "text" else "byte",
                        model_path)
            model = model.to(device).eval()
            rows = evaluate(model, cfg, exp.eval, variant)
            rec = {"variant": variant, "seed": seed, "model_path": str(model_path), "memory_caching": settings,
                   "params": sum(p.numel() for p in model.parameters()), "train_seq_len": cfg.data.seq_len,
                   "wall_eval_s": time.perf_counter() - t1, "rows": rows}
            records.append(rec)
            print(f"[{exp.task}] {model_path} {variant} seed {seed}: evaluated in {rec['wall_eval_s']:.0f} s",
                  flush=True)
    result = {"task": exp.task, "description": exp.description, "command": command_line(),
              "experiment": exp.path, "quick": exp.quick, "commit": git_commit(), "machine": machine(),
              "model_path": str(model_path), "device": str(device), "threads": threads or torch.get_num_threads(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": time.perf_counter() - t0,
              "config": exp.raw, "runs": records}
    write_json(out / RESULTS_NAME, result)
    return result
