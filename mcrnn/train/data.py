"""Batches for the trainer, a pure function of (seed, step): resuming and sharding need no data state.

The *global* batch of a step (``train.batch_size`` rows) is the same whatever the number of ranks and of
accumulation micro-batches; rank ``r`` takes its contiguous slice and cuts it into micro-batches. So one
process on batch ``2B`` and two DDP processes on ``B`` each see exactly the same rows.

Every batch is ``(inputs [B, L], labels [B, L])`` int64 with labels already shifted (the logits at ``t``
are scored against ``labels[t]``; ``-100`` is ignored), the convention of :mod:`mcrnn.data`; the trainer
scores them with ``mcrnn.models.causal_lm_loss(logits, shift_labels=labels)``.
"""

from __future__ import annotations

import torch

from mcrnn.data import ByteTokenizer, TextDataset, get_tokenizer, mqar, mqar_spread, niah_batch, split_seeds
from mcrnn.data.packing import packed_rows

from .config import DataConfig, kv_pairs, niah_variants

# torch's CPU generator keeps only the low 32 bits of a seed, so (seed, step) is folded into 31 bits;
# a step stride of 1_000_003 keeps the steps of one run distinct up to 2**31 steps (different user seeds
# only meet after a million steps). split_seeds then gives even seeds to training batches and odd ones to
# the held-out set, so no training batch can share a generator seed with it.
_STEP_STRIDE = 1_000_003


def step_seed(seed: int, step: int) -> int:
    return (seed * _STEP_STRIDE + step) % (1 << 31)


class MQARBatches:
    """Fresh MQAR examples every step (infinite data), and a fixed held-out set."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.fn = mqar_spread if cfg.task == "mqar_spread" else mqar
        default_a = 1.0 if cfg.task == "mqar_spread" else 0.01  # mcrnn.data's defaults
        self.power_a = cfg.power_a if cfg.power_a is not None else default_a
        self.vocab_size = cfg.vocab_size

    def _make(self, rows: int, pairs: int, seed: int):
        c = self.cfg
        return self.fn(rows, c.seq_len, c.vocab_size, pairs, self.power_a, c.random_non_queries, seed)

    def global_batch(self, step: int, batch_size: int):
        ns = kv_pairs(self.cfg)
        if len(ns) == 1:
            return self._make(batch_size, ns[0], split_seeds(step_seed(self.seed, step))[0])
        # a mix of difficulties: an equal share of rows per value, each from its own seed, then shuffled
        # so that every rank and micro-batch gets the mix
        J = len(ns)
        parts = [self._make(batch_size // J, n, split_seeds(step_seed(self.seed, step * J + j))[0])
                 for j, n in enumerate(ns)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(step_seed(self.seed, step)))
        return x[perm], y[perm]

    def eval_set(self):
        n = self.cfg.eval_num_kv_pairs or max(kv_pairs(self.cfg))
        return self._make(self.cfg.num_eval, n, split_seeds(self.seed)[1])


class TextBatches:
    """Random windows of the packed train split (drawn with a generator seeded by the step).

    ``separate_documents``: the datasets keep where documents start (and ignore the labels of ``eos`` inputs),
    and :meth:`packed_batch` gives a step's windows as one packed row with its ``cu_seqlens``, so that a model
    called with them never lets a token read another document. Off by default (batches as before).
    """

    def __init__(self, cfg: DataConfig, seed: int, separate_documents: bool = False):
        self.cfg, self.seed = cfg, seed
        tok = get_tokenizer(cfg.tokenizer, cfg.bpe_vocab_size)
        self.vocab_size = tok.vocab_size
        self.eos_id = tok.eos_id
        self.separate_documents = separate_documents
        self.train = TextDataset("train", tok, cfg.seq_len, source=cfg.source, separate_documents=separate_documents)
        self.valid = TextDataset("valid", tok, cfg.seq_len, source=cfg.source, separate_documents=separate_documents)
        for name, ds in (("train", self.train), ("valid", self.valid)):
            if len(ds) == 0:
                raise ValueError(f"data.seq_len: {cfg.seq_len} is longer than the {name} split of "
                                 f"source={cfg.source!r}")

    def _rows(self, step: int, batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.seed, step))
        return torch.randint(0, len(self.train), (batch_size,), generator=g)

    def global_batch(self, step: int, batch_size: int):
        idx = self._rows(step, batch_size)
        return self.train.inputs[idx], self.train.labels[idx]

    def packed_batch(self, step: int, batch_size: int):
        """The windows of :meth:`global_batch` as one packed row: ``(inputs [1, B·L], labels [1, B·L],
        cu_seqlens)``, one sequence per document piece (needs ``separate_documents``)."""
        if not self.separate_documents:
            raise ValueError("packed_batch needs TextBatches(..., separate_documents=True)")
        idx = self._rows(step, batch_size)
        return packed_rows(self.train.inputs[idx], self.train.labels[idx], self.train.starts[idx])

    def eval_set(self):
        n = min(len(self.valid), self.cfg.num_eval)
        return self.valid.inputs[:n], self.valid.labels[:n]


class NIAHBatches:
    """Fresh S-NIAH examples every step (an equal mix of ``data.niah_variants``, random depths, training keys
    and train-split haystacks), and a held-out set from the valid split's haystacks and the held-out keys.

    ``data.niah_label`` picks the labelled bytes (the query's and the answer's, or the answer's only), so the
    trainer's eval accuracy is the token accuracy on those bytes.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.variants = niah_variants(cfg)
        self.vocab_size = ByteTokenizer.vocab_size

    def global_batch(self, step: int, batch_size: int):
        c = self.cfg
        return niah_batch(self.variants, batch_size, c.seq_len, split_seeds(step_seed(self.seed, step))[0],
                          "train", c.source, label=c.niah_label, keys=c.niah_keys)

    def eval_set(self):
        c = self.cfg
        return niah_batch(self.variants, c.num_eval, c.seq_len, split_seeds(self.seed)[1], "valid", c.source,
                          label=c.niah_label, keys=c.niah_keys)


def make_batches(cfg: DataConfig, seed: int):
    if cfg.task == "text":
        return TextBatches(cfg, seed, separate_documents=cfg.separate_documents)
    if cfg.task == "niah":
        return NIAHBatches(cfg, seed)
    return MQARBatches(cfg, seed)


def shard(batch, rank: int, world: int, grad_accum: int):
    """Rank ``rank``'s micro-batches of a global batch: a list of ``grad_accum`` ``(inputs, labels)``."""
    x, y = batch
    per_rank = x.shape[0] // world
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    return list(zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True))
