"""MQAR recall accuracy over a grid of sequence lengths and numbers of key-value pairs.

The models train on one length (``data.seq_len``) and a mix of pair counts; this task measures them on
held-out examples at every ``(seq_len, num_kv_pairs)`` of the ``eval`` section, including lengths and pair
counts beyond training, where a fixed-size recurrent state runs out and Memory Caching's cache keeps growing::

    eval:
      seq_lens: [64, 128, 256]        # evaluation lengths (default: the training length)
      num_kv_pairs: [4, 8, 12, 16]    # pairs per example (cells with 4 n > L or 2 n + 2 > vocab are skipped)
      pairs_per_token: 0.125          # instead of num_kv_pairs: n = L / 8 at every length (pairs grow with L)
      num_examples: 256               # held-out examples per cell
      batch_size: 128

Rows: ``{"seq_len", "num_kv_pairs", "accuracy", "n_examples", "n_diverged", "divergence_rate", "chance",
"guess_among_values"}`` with per-query accuracy (the fraction of queried values recalled, the trainer's
``eval_acc``). Divergence is scored per example: an example whose logits are not all finite (the model's
state overflowed), or whose forward pass alone raises on a NaN/inf gate, counts as wrong on every query, and
the others keep their score; ``n_diverged`` counts those examples and a cell with any carries
``"diverged": reason``. ``chance`` is a uniform guess among the value tokens, ``guess_among_values`` a uniform
guess among the example's ``n`` values (both from the task settings, see :func:`chance_levels`). Held-out
generator seeds are odd, training seeds even (:func:`mcrnn.data.split_seeds`), so no evaluation example is a
training example.
"""

from __future__ import annotations

import re

import torch

from mcrnn.data import mqar, mqar_spread, split_seeds
from mcrnn.train.config import Config

# the evaluation grid's generator seeds: one per cell, far from the trainer's (seed, step) seeds
_EVAL_SEED_BASE = 7_000_003
# how the ops report a non-finite gate (ValueError "gate `x` contains NaN or inf"): that example diverged
_NON_FINITE = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def cell_seed(seed: int, seq_len: int, num_kv_pairs: int) -> int:
    """The held-out generator seed of one grid cell (odd: never a training batch's seed)."""
    return split_seeds((_EVAL_SEED_BASE + 1009 * seed + 31 * seq_len + num_kv_pairs) % (1 << 30))[1]


def grid(cfg: Config, spec: dict) -> list[tuple[int, int]]:
    """The ``(seq_len, num_kv_pairs)`` cells a model trained with ``cfg`` can be measured on."""
    d = cfg.data
    lens = spec.get("seq_lens") or [d.seq_len]
    ratio = spec.get("pairs_per_token")
    if ratio is not None:
        if spec.get("num_kv_pairs"):
            raise ValueError("eval: give num_kv_pairs or pairs_per_token, not both")
        if not 0 < float(ratio) <= 0.25:
            raise ValueError(f"eval.pairs_per_token: must be in (0, 0.25] (4 n <= L), got {ratio!r}")
        cells = [(L, max(1, int(L * float(ratio)))) for L in lens]
        too_many = [(L, n) for L, n in cells if 2 * n + 2 > d.vocab_size]
        if too_many:
            raise ValueError(f"eval.pairs_per_token: {too_many[0][1]} pairs at L={too_many[0][0]} need "
                             f"data.vocab_size >= {2 * too_many[0][1] + 2} (distinct keys and values); "
                             f"raise vocab_size or drop the longest seq_lens")
        return [(L, n) for L, n in cells if L % 2 == 0]
    pairs = spec.get("num_kv_pairs") or [d.eval_num_kv_pairs or max(d.num_kv_pairs if isinstance(
        d.num_kv_pairs, list) else [d.num_kv_pairs])]
    return [(L, n) for L in lens for n in pairs if 4 * n <= L and 2 * n + 2 <= d.vocab_size and L % 2 == 0]


def chance_levels(vocab_size: int, num_kv_pairs: int) -> dict[str, float]:
    """Accuracy of two guessers that never read the keys: ``chance``, uniform over the value tokens
    (``[V // 2, V)``, where :func:`mcrnn.data.mqar` and ``mqar_spread`` draw values), and
    ``guess_among_values``, uniform over the ``n`` distinct values of the example (the answers it can have)."""
    return {"chance": 1.0 / (vocab_size - vocab_size // 2), "guess_among_values": 1.0 / num_kv_pairs}


def _predict(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """``(predictions [B, L], finite [B] bool, reason)`` of one batch. A forward that raises on a non-finite
    gate is bisected until the examples that raise stand alone: one diverging example costs no other its score."""
    try:
        logits = model(input_ids=x, use_cache=False).logits
    except ValueError as e:
        if not _NON_FINITE.search(str(e)):
            raise
        if x.shape[0] == 1:
            return torch.full(x.shape, -1, dtype=torch.long), torch.zeros(1, dtype=torch.bool), str(e)
        half = x.shape[0] // 2
        p1, f1, r1 = _predict(model, x[:half])
        p2, f2, r2 = _predict(model, x[half:])
        return torch.cat([p1, p2]), torch.cat([f1, f2]), r1 or r2
    finite = torch.isfinite(logits).flatten(1).all(dim=1).cpu()
    reason = None if bool(finite.all()) else "non-finite logits"
    return logits.argmax(-1).cpu(), finite, reason


@torch.no_grad()
def score(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> dict:
    """Per-query accuracy of ``model`` on ``inputs/labels [N, L]`` with divergence scored per example.

    Returns ``{"accuracy", "n_diverged", "reason"}``: a diverged example (non-finite logits anywhere, or a
    forward that raises on a NaN/inf gate) is wrong on every labelled position; ``reason`` says why the first
    one diverged (``None`` when none did).
    """
    device = next(model.parameters()).device
    preds, finite, reason = [], [], None
    for i in range(0, inputs.shape[0], batch_size):
        p, f, r = _predict(model, inputs[i:i + batch_size].to(device))
        preds.append(p)
        finite.append(f)
        reason = reason or r
    preds, finite = torch.cat(preds), torch.cat(finite)
    mask = labels != -100
    if not bool(mask.any()):
        raise ValueError("labels has no labelled position (all -100)")
    correct = (preds == labels) & mask & finite[:, None]
    return {"accuracy": float(correct.sum()) / int(mask.sum()), "n_diverged": int((~finite).sum()),
            "reason": reason}


def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Per-query accuracy of ``model`` on ``inputs/labels [N, L]`` (diverged examples wrong, see :func:`score`)."""
    return score(model, inputs, labels, batch_size)["accuracy"]


def evaluate(model, cfg: Config, spec: dict, variant: str) -> list[dict]:
    d = cfg.data
    fn = mqar_spread if d.task == "mqar_spread" else mqar
    power_a = d.power_a if d.power_a is not None else (1.0 if d.task == "mqar_spread" else 0.01)
    n_ex = int(spec.get("num_examples", 256))
    rows = []
    for L, n in grid(cfg, spec):
        x, y = fn(n_ex, L, d.vocab_size, n, power_a, d.random_non_queries, cell_seed(cfg.train.seed, L, n))
        s = score(model, x, y, int(spec.get("batch_size", 128)))
        row = {"seq_len": L, "num_kv_pairs": n, "accuracy": s["accuracy"], "n_examples": n_ex,
               "n_diverged": s["n_diverged"], "divergence_rate": s["n_diverged"] / n_ex,
               **chance_levels(d.vocab_size, n)}
        if s["reason"]:
            row["diverged"] = s["reason"]
        rows.append(row)
    return rows
