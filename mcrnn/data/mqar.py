"""Multi-query associative recall (MQAR) data, after Zoology (Arora et al., 2023).

Token layout of :func:`mqar` (``L = seq_len``, ``n = num_kv_pairs``)::

    position   0   1   2   3  ...  2n-2 2n-1 | 2n ... L-1
    inputs     k0  v0  k1  v1 ...  kn-1 vn-1 | filler, with each key k_i repeated once as a query
    labels    -100 everywhere except at the position of each query key, where the label is its value

Label convention (Zoology's): ``labels`` are already shifted for next-token prediction, so the logits a
causal model produces at position ``t`` are scored against ``labels[t]``. At a query position ``t``,
``inputs[t]`` is the key and ``labels[t]`` is its value: the model reads the key and must emit the value
as the *next* token. The value itself never appears after the query in ``inputs`` (``inputs[t + 1]`` is
filler), so there is no teacher forcing of the answer. The pairs section carries no labels.

- Keys are drawn without replacement from ``[1, vocab_size // 2)`` (unique within an example; 0 is kept
  free as the "empty" token of Zoology), values without replacement from ``[vocab_size // 2, vocab_size)``.
- Queries sit at even offsets ``2 g`` after the pairs section (``g`` counts token *pairs*); the gaps ``g``
  are drawn without replacement from ``{0, …, (L − 2n) // 2 − 1}`` with probability
  ``∝ power_a · (g + 1) ** (power_a − 1)`` (a power law: small ``power_a`` puts the queries near the pairs;
  ``power_a = 1`` is uniform). Each key is queried exactly once.
- Filler positions are 0, or, with ``random_non_queries=True``, uniform tokens of ``[0, vocab_size)``
  (which may by chance equal a key or a value, exactly as in Zoology).

:func:`mqar_spread` spreads the pairs over the whole context instead (for segmented memories) and puts
every query after its own pair; see its docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100

# Rows generated per block; keeps the [block, vocab] scratch tensors small. A fixed constant, so the
# stream of random numbers (and therefore the data) does not depend on memory settings.
_BLOCK = 2048


def _check_common(num_examples: int, seq_len: int, vocab_size: int, num_kv_pairs: int) -> None:
    if not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    if not isinstance(num_kv_pairs, int) or num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs must be a positive int, got {num_kv_pairs!r}")
    if not isinstance(seq_len, int) or seq_len < 2 or seq_len % 2:
        raise ValueError(f"seq_len must be an even int >= 2, got {seq_len!r}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} too large for seq_len={seq_len}: the pairs and the queries need "
            f"4 * num_kv_pairs = {4 * num_kv_pairs} tokens"
        )
    if not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    n_keys, n_values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    if num_kv_pairs > min(n_keys, n_values):
        raise ValueError(
            f"vocab_size={vocab_size} too small for num_kv_pairs={num_kv_pairs}: it offers {n_keys} keys "
            f"[1, {vocab_size // 2}) and {n_values} values [{vocab_size // 2}, {vocab_size}); need "
            f"vocab_size >= {2 * num_kv_pairs + 2}"
        )


def _power_law(space: int, power_a: float) -> torch.Tensor:
    """``[space]`` float64 probabilities ``∝ power_a * i ** (power_a - 1)``, ``i = 1 … space``."""
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a!r}")
    i = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


def _distinct(num: int, low: int, high: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[num, k]`` int64: per row, ``k`` distinct uniform draws from ``[low, high)``, in random order."""
    out = torch.empty(num, k, dtype=torch.long)
    for s in range(0, num, _BLOCK):
        rows = min(_BLOCK, num - s)
        scores = torch.rand(rows, high - low, generator=gen)
        out[s : s + rows] = scores.topk(k, dim=1).indices + low
    return out


def _fill(inputs: torch.Tensor, taken: torch.Tensor, vocab_size: int, random_non_queries: bool,
          gen: torch.Generator) -> torch.Tensor:
    """Fill the positions where ``taken`` is False with random tokens (or leave them 0)."""
    if random_non_queries:
        noise = torch.randint(0, vocab_size, inputs.shape, generator=gen)
        inputs = torch.where(taken, inputs, noise)
    return inputs


def mqar(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's multi-query associative recall (see the module docstring for the layout).

    Args:
        num_examples: N, the number of sequences.
        seq_len: L, even, ``>= 4 * num_kv_pairs``.
        vocab_size: V, ``>= 2 * num_kv_pairs + 2``; keys come from ``[1, V // 2)``, values from
            ``[V // 2, V)``.
        num_kv_pairs: n, the number of key-value pairs (and of queries) per sequence.
        power_a: exponent of the power law over the query gaps (``1.0`` = uniform).
        random_non_queries: fill non-query positions with uniform random tokens instead of 0.
        seed: the data are a deterministic function of all the arguments.

    Returns:
        ``inputs [N, L] int64`` and ``labels [N, L] int64`` (``-100`` except at the n query positions,
        where the label is the value of the queried key).
    """
    _check_common(num_examples, seq_len, vocab_size, num_kv_pairs)
    p = _power_law((seq_len - 2 * num_kv_pairs) // 2, power_a)
    gen = torch.Generator().manual_seed(int(seed))
    n, N, L = num_kv_pairs, num_examples, seq_len
    ctx = 2 * n
    keys = _distinct(N, 1, vocab_size // 2, n, gen)
    values = _distinct(N, vocab_size // 2, vocab_size, n, gen)
    # gaps (in token pairs) drawn without replacement with the power-law weights
    gaps = torch.empty(N, n, dtype=torch.long)
    for s in range(0, N, _BLOCK):
        rows = min(_BLOCK, N - s)
        gaps[s : s + rows] = torch.multinomial(p.expand(rows, -1), n, replacement=False, generator=gen)
    qpos = ctx + 2 * gaps  # [N, n], even positions of the queries

    inputs = torch.zeros(N, L, dtype=torch.long)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    inputs.scatter_(1, qpos, keys)
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, qpos, values)
    taken = torch.zeros(N, L, dtype=torch.bool)
    taken[:, :ctx] = True
    taken.scatter_(1, qpos, True)
    return _fill(inputs, taken, vocab_size, random_non_queries, gen), labels


def mqar_spread(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 1.0,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR with the key-value pairs spread over the whole context, each query after its own pair.

    Same tokens and label convention as :func:`mqar` (keys from the lower half of the vocabulary, unique;
    values from the upper half; the label sits at the query key's position and is its value), but the
    layout is made for segmented (cached) memories, whose segments should each hold some pairs:

    - The sequence is viewed as ``S = L // 2`` slots of two tokens; a slot holds a pair ``(k, v)``, a
      query ``(k, filler)`` or filler.
    - Pair slots are stratified over ``[0, S − n)``: pair ``i`` (in order of position) is uniform in the
      ``i``-th of ``n`` equal strata, so the pairs cover the whole context apart from its last ``n``
      slots, and any window of about ``4 (S − n) / n`` tokens or more holds at least one pair.
    - The query of each pair goes into a free slot *after* its pair slot, chosen (latest pair first)
      with probability ``∝ gap ** (power_a − 1)`` over the free later slots (``gap`` = distance in slots;
      the default ``power_a = 1`` is uniform, so queries spread over everything after their pair). That
      always succeeds: pair slots end before ``S − n``, which leaves enough free later slots.
    - Keys and values sit at even and odd positions, queries at even positions, as in :func:`mqar`.

    Args and returns as in :func:`mqar`: ``inputs [N, L] int64``, ``labels [N, L] int64``.
    """
    _check_common(num_examples, seq_len, vocab_size, num_kv_pairs)
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n, N, L = num_kv_pairs, num_examples, seq_len
    S = L // 2
    keys = _distinct(N, 1, vocab_size // 2, n, gen)
    values = _distinct(N, vocab_size // 2, vocab_size, n, gen)

    # pair slots: stratified over [0, S - n); strata [b_i, b_{i+1}) are non-empty because S - n >= n
    bounds = torch.tensor([(i * (S - n)) // n for i in range(n + 1)], dtype=torch.long)
    width = (bounds[1:] - bounds[:-1]).to(torch.float64)
    pslot = bounds[:-1] + (torch.rand(N, n, generator=gen, dtype=torch.float64) * width).long()

    # query slots: latest pair first, one free later slot each, drawn with weights w(gap) by
    # Efraimidis-Spirakis keys log(u) / w (the max key is a draw ∝ w)
    qslot = torch.empty(N, n, dtype=torch.long)
    slots = torch.arange(S)
    inv_w = torch.arange(S, dtype=torch.float64).clamp(min=1) ** (1.0 - power_a)  # 1 / w(gap), by gap
    inv_w = inv_w.to(torch.float32)
    neg_inf = torch.tensor(-math.inf)
    for s in range(0, N, _BLOCK):
        rows = min(_BLOCK, N - s)
        ps = pslot[s : s + rows]
        used = torch.zeros(rows, S, dtype=torch.bool)
        used.scatter_(1, ps, True)
        ar = torch.arange(rows)
        for i in range(n - 1, -1, -1):
            gap = slots[None, :] - ps[:, i : i + 1]  # [rows, S]
            ok = (gap > 0) & ~used
            key = torch.rand(rows, S, generator=gen).clamp_(min=1e-38).log_()
            if power_a != 1.0:
                key = key * inv_w[gap.clamp(min=0)]
            pick = torch.where(ok, key, neg_inf).argmax(dim=1)
            qslot[s : s + rows, i] = pick
            used[ar, pick] = True

    inputs = torch.zeros(N, L, dtype=torch.long)
    inputs.scatter_(1, 2 * pslot, keys)
    inputs.scatter_(1, 2 * pslot + 1, values)
    inputs.scatter_(1, 2 * qslot, keys)
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, 2 * qslot, values)
    taken = torch.zeros(N, L, dtype=torch.bool)
    for pos in (2 * pslot, 2 * pslot + 1, 2 * qslot):
        taken.scatter_(1, pos, True)
    return _fill(inputs, taken, vocab_size, random_non_queries, gen), labels


def mqar_accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor, reduction: str = "example") -> float:
    """Recall accuracy on the labelled positions (``labels != -100``).

    Args:
        logits_or_preds: ``[N, L, V]`` float logits (argmax is taken) or ``[N, L]`` integer predictions,
            aligned with ``labels`` (prediction at ``t`` is scored against ``labels[t]``).
        labels: ``[N, L]`` int64 with ``-100`` at ignored positions.
        reduction: ``"example"`` (default): mean over examples of each example's accuracy; examples with
            no labelled position are left out. ``"token"``: fraction of all labelled positions correct.

    Returns:
        A Python float in ``[0, 1]``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, L], got shape {tuple(labels.shape)}")
    x = logits_or_preds
    preds = x.argmax(dim=-1) if x.is_floating_point() else x
    if preds.shape != labels.shape:
        raise ValueError(
            f"logits_or_preds must be [N, L, V] or [N, L] matching labels {tuple(labels.shape)}, "
            f"got {tuple(x.shape)}"
        )
    mask = labels != IGNORE_INDEX
    correct = (preds == labels) & mask
    if reduction == "token":
        total = int(mask.sum())
        if total == 0:
            raise ValueError("labels has no labelled position (all -100)")
        return float(correct.sum()) / total
    if reduction != "example":
        raise ValueError(f"reduction must be 'example' or 'token', got {reduction!r}")
    per = mask.sum(dim=1)
    has = per > 0
    if not bool(has.any()):
        raise ValueError("labels has no labelled position (all -100)")
    acc = correct.sum(dim=1)[has].double() / per[has].double()
    return float(acc.mean())


class MQARDataset(Dataset):
    """A fixed set of MQAR sequences; item ``i`` is ``(inputs[i] [L], labels[i] [L])``, int64."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if inputs.shape != labels.shape or inputs.dim() != 2:
            raise ValueError(f"inputs and labels must both be [N, L]: {inputs.shape} vs {labels.shape}")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]


def split_seeds(seed: int) -> tuple[int, int]:
    """The (train, test) generator seeds for a user seed: ``2 * seed`` and ``2 * seed + 1``.

    Distinct user seeds never share a generator seed, and train never shares one with test.
    """
    return 2 * int(seed), 2 * int(seed) + 1


def _row_keys(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x}


def mqar_splits(
    num_train: int,
    num_test: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int | Sequence[int],
    seed: int = 0,
    spread: bool = False,
    power_a: float | None = None,
    test_power_a: float | None = None,
    random_non_queries: bool = True,
) -> tuple[MQARDataset, MQARDataset]:
    """Train and test MQAR sets, reproducible from ``seed``, generated from disjoint seeds.

    Args:
        num_train, num_test: numbers of sequences (per ``num_kv_pairs`` value).
        num_kv_pairs: an int, or a list of ints to mix several difficulties (each generated with its own
            seed offset and concatenated; train rows are shuffled deterministically).
        spread: use :func:`mqar_spread` instead of :func:`mqar`.
        power_a: power law of the query gaps (default 0.01 for ``mqar``, 1.0 for ``mqar_spread``);
            ``test_power_a`` defaults to ``power_a``.

    Test rows that happen to equal a train row (possible only for tiny vocabularies) are removed with a
    warning, so the two sets are always disjoint.

    Returns:
        ``(train, test)`` :class:`MQARDataset` s of ``[num_train, L]`` / ``[≤ num_test, L]`` int64 rows.
    """
    fn = mqar_spread if spread else mqar
    if power_a is None:
        power_a = 1.0 if spread else 0.01
    if test_power_a is None:
        test_power_a = power_a
    ns = [num_kv_pairs] if isinstance(num_kv_pairs, int) else list(num_kv_pairs)
    if not ns:
        raise ValueError("num_kv_pairs must be an int or a non-empty list of ints")
    train_seed, test_seed = split_seeds(seed)
    tr, te = [], []
    for j, n in enumerate(ns):
        # an offset of j << 40 keeps the parity, so train and test seeds never meet
        off = j << 40
        tr.append(fn(num_train, seq_len, vocab_size, n, power_a, random_non_queries, train_seed + off))
        te.append(fn(num_test, seq_len, vocab_size, n, test_power_a, random_non_queries, test_seed + off))
    tr_x, tr_y = torch.cat([a for a, _ in tr]), torch.cat([b for _, b in tr])
    te_x, te_y = torch.cat([a for a, _ in te]), torch.cat([b for _, b in te])
    if len(ns) > 1:
        perm = torch.randperm(tr_x.shape[0], generator=torch.Generator().manual_seed(train_seed))
        tr_x, tr_y = tr_x[perm], tr_y[perm]
    seen = _row_keys(tr_x)
    keep = torch.tensor([bytes(r.numpy().tobytes()) not in seen for r in te_x], dtype=torch.bool)
    if te_x.shape[0] and not bool(keep.all()):
        warnings.warn(f"mqar_splits: dropped {int((~keep).sum())} test rows that also occur in train",
                      stacklevel=2)
        te_x, te_y = te_x[keep], te_y[keep]
    return MQARDataset(tr_x, tr_y), MQARDataset(te_x, te_y)
