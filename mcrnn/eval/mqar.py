"""MQAR recall accuracy over a grid of sequence lengths and numbers of key-value pairs.

The models train on one length (``data.seq_len``) and a mix of pair counts; this task measures them on
held-out examples at every ``(seq_len, num_kv_pairs)`` of the ``eval`` section, including lengths and pair
counts beyond training, where a fixed-size recurrent state runs out and Memory Caching's cache keeps growing::

    eval:
      seq_lens: [64, 128, 256]        # evaluation lengths (default: the training length)
      num_kv_pairs: [4, 8, 12, 16]    # pairs per example (cells with 4 n > L or 2 n + 2 > vocab are skipped)
      num_examples: 256               # held-out examples per cell
      batch_size: 128

Rows: ``{"seq_len", "num_kv_pairs", "accuracy", "n_examples"}`` with per-query accuracy (the fraction of
queried values recalled, the trainer's ``eval_acc``); a cell where the model's state overflows (NaN) scores 0
and carries ``"diverged": reason``. Held-out generator seeds are odd, training seeds even
(:func:`mcrnn.data.split_seeds`), so no evaluation example is a training example.
"""

from __future__ import annotations

import torch

from mcrnn.data import mqar, mqar_accuracy, mqar_spread, split_seeds
from mcrnn.train.config import Config

# the evaluation grid's generator seeds: one per cell, far from the trainer's (seed, step) seeds
_EVAL_SEED_BASE = 7_000_003


def cell_seed(seed: int, seq_len: int, num_kv_pairs: int) -> int:
    """The held-out generator seed of one grid cell (odd: never a training batch's seed)."""
    return split_seeds((_EVAL_SEED_BASE + 1009 * seed + 31 * seq_len + num_kv_pairs) % (1 << 30))[1]


def grid(cfg: Config, spec: dict) -> list[tuple[int, int]]:
    """The ``(seq_len, num_kv_pairs)`` cells a model trained with ``cfg`` can be measured on."""
    d = cfg.data
    lens = spec.get("seq_lens") or [d.seq_len]
    pairs = spec.get("num_kv_pairs") or [d.eval_num_kv_pairs or max(d.num_kv_pairs if isinstance(
        d.num_kv_pairs, list) else [d.num_kv_pairs])]
    return [(L, n) for L in lens for n in pairs if 4 * n <= L and 2 * n + 2 <= d.vocab_size and L % 2 == 0]


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Per-query accuracy of ``model`` on ``inputs/labels [N, L]`` (token reduction over labelled positions)."""
    device = next(model.parameters()).device
    preds = []
    for i in range(0, inputs.shape[0], batch_size):
        logits = model(input_ids=inputs[i:i + batch_size].to(device), use_cache=False).logits
        preds.append(logits.argmax(-1).cpu())
    return mqar_accuracy(torch.cat(preds), labels, reduction="token")


def evaluate(model, cfg: Config, spec: dict, variant: str) -> list[dict]:
    d = cfg.data
    fn = mqar_spread if d.task == "mqar_spread" else mqar
    power_a = d.power_a if d.power_a is not None else (1.0 if d.task == "mqar_spread" else 0.01)
    n_ex = int(spec.get("num_examples", 256))
    rows = []
    for L, n in grid(cfg, spec):
        x, y = fn(n_ex, L, d.vocab_size, n, power_a, d.random_non_queries, cell_seed(cfg.train.seed, L, n))
        try:
            acc = accuracy(model, x, y, int(spec.get("batch_size", 128)))
        except ValueError as e:
            if "NaN" not in str(e):
                raise
            # a memory that overflows beyond its training length recalls nothing: score 0, say why
            rows.append({"seq_len": L, "num_kv_pairs": n, "accuracy": 0.0, "n_examples": n_ex,
                         "diverged": str(e)})
            continue
        rows.append({"seq_len": L, "num_kv_pairs": n, "accuracy": acc, "n_examples": n_ex})
    return rows
