"""The evaluation suite: ``mcrnn eval TASK CONFIG.yaml`` and ``mcrnn report`` (docs/results.md).

Tasks (each a module of this package with ``evaluate(model, cfg, spec, variant) -> list[dict]``, the rows of
one trained run, or ``run(exp, out, ...) -> dict`` for tasks that train nothing):

- ``mqar``: recall accuracy over a grid of sequence lengths and numbers of key-value pairs (also the
  ablations and the equal-state control, which are MQAR experiments with other variants);
- ``niah``: single needle in a haystack (S-NIAH-1/2/3), greedy generation with the Memory Caching cache;
- ``lm``: perplexity, loss by position, associative-recall hits, length extrapolation and post-training MC;
- ``throughput``: training and decoding tokens/s and peak memory of whole models vs sequence length.

Python API: :func:`run_task`; the experiment-file format is in :mod:`mcrnn.eval.common`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .common import Experiment, load_experiment, load_model, mean_std, run_experiment, state_floats

TASKS = ("mqar", "niah", "lm", "throughput")


def task_module(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {list(TASKS)}")
    return importlib.import_module(f"mcrnn.eval.{task}")


def run_task(task: str, config: str | Path, out: str | Path | None = None, quick: bool = False,
             jobs: int = 1, threads: int | None = None, overrides: dict | None = None,
             only: list[str] | None = None, retrain: bool = False) -> dict:
    """Run one experiment file; returns the results dict also written to ``OUT/results.json``.

    ``out`` defaults to ``results/eval/<config stem>`` (``.../quick`` with ``quick``).
    """
    mod = task_module(task)
    exp = load_experiment(config, task, quick=quick, overrides=overrides, only=only)
    if out is None:
        out = Path("results/eval") / Path(config).stem / ("quick" if quick else "full")
    if hasattr(mod, "run"):
        return mod.run(exp, out, jobs=jobs, threads=threads)
    return run_experiment(exp, mod.evaluate, out, jobs=jobs, threads=threads, retrain=retrain)


__all__ = ["TASKS", "Experiment", "load_experiment", "load_model", "mean_std", "run_experiment", "run_task",
           "state_floats", "task_module"]
