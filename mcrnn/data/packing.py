"""Packing token streams into fixed-length causal-LM examples, and the text dataset.

Convention: a window is ``seq_len + 1`` tokens; ``inputs = window[:-1]`` and ``labels = window[1:]``
(labels already shifted, as for MQAR: the logits at position ``t`` are scored against ``labels[t]``).
Consecutive windows overlap by one token (stride ``seq_len``), so every token of the stream except the
first is a label exactly once, apart from the remainder below.

Documents: with ``separate_documents`` (:class:`TextDataset`) a window also carries where its documents start
(:func:`document_starts`); :func:`packed_rows` flattens a batch of windows into one row and its
``cu_seqlens``, so that a model called with them (``MCForCausalLM(input_ids, cu_seqlens=...)``) never lets a
token read another document, and the label of a document's last token (its ``eos``) is ignored.

Remainder: a stream of ``T`` tokens gives ``N = (T − 1) // seq_len`` full windows; its last
``(T − 1) % seq_len`` tokens are dropped by :func:`pack`, or kept by :func:`pack_causal` with
``pad_id`` (the last window is padded, padded labels are ``-100``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .corpus import load_documents
from .mqar import IGNORE_INDEX
from .tokenization import ByteTokenizer


def _as_tensor(token_ids) -> torch.Tensor:
    t = token_ids if isinstance(token_ids, torch.Tensor) else torch.as_tensor(list(token_ids))
    if t.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and t.is_floating_point():
        raise ValueError("token_ids must be integers")
    return t.long()


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")


def pack(token_ids: Sequence[int] | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream ``[T]`` into ``[N, seq_len + 1]`` windows with stride ``seq_len``.

    ``N = (T − 1) // seq_len``; the last ``(T − 1) % seq_len`` tokens are dropped (see
    :func:`pack_remainder`). Window ``i`` is ``token_ids[i*seq_len : i*seq_len + seq_len + 1]``.
    """
    _check_seq_len(seq_len)
    t = _as_tensor(token_ids)
    n = max(t.numel() - 1, 0) // seq_len
    if n == 0:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    return t[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


def pack_remainder(num_tokens: int, seq_len: int) -> int:
    """How many tokens :func:`pack` drops from a stream of ``num_tokens``."""
    _check_seq_len(seq_len)
    return max(num_tokens - 1, 0) % seq_len


def pack_causal(token_ids: Sequence[int] | torch.Tensor, seq_len: int,
                pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(inputs [N, seq_len], labels [N, seq_len])`` int64 for next-token prediction.

    Without ``pad_id`` the remainder is dropped as in :func:`pack`. With ``pad_id`` the remainder becomes
    one more window, padded with ``pad_id`` in ``inputs`` and ``-100`` in ``labels``; then every token
    except the first is a label exactly once.
    """
    t = _as_tensor(token_ids)
    w = pack(t, seq_len)
    inputs, labels = w[:, :-1], w[:, 1:].clone()
    rem = pack_remainder(t.numel(), seq_len)
    if pad_id is not None and rem > 0:
        tail = t[w.shape[0] * seq_len :]  # rem + 1 tokens: rem inputs-and-labels plus the first input
        x = torch.full((1, seq_len), int(pad_id), dtype=torch.long)
        y = torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long)
        x[0, :rem] = tail[:-1]
        y[0, :rem] = tail[1:]
        inputs, labels = torch.cat([inputs, x]), torch.cat([labels, y])
    return inputs.contiguous(), labels


def document_starts(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[N, L]`` bool: where a document starts in each window of ``inputs [N, L]`` (the token after an
    ``eos_id``), and at every window's first token (a window is a sequence of its own)."""
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos_id
    return starts


def packed_rows(inputs: torch.Tensor, labels: torch.Tensor, starts: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten a batch of windows ``inputs, labels, starts: [B, L]`` into one packed row: ``(inputs [1, B * L],
    labels [1, B * L], cu_seqlens [n + 1] int32)``, one sequence per document piece of every window (fla's
    ``cu_seqlens`` convention, as :func:`mcrnn.ops.memory_caching` and the models take it)."""
    if inputs.shape != labels.shape or inputs.shape != starts.shape or inputs.dim() != 2:
        raise ValueError(f"inputs, labels and starts must all be [B, L], got {tuple(inputs.shape)}, "
                         f"{tuple(labels.shape)} and {tuple(starts.shape)}")
    if not bool(starts[:, 0].all()):
        raise ValueError("`starts` must mark every window's first token (each window is a sequence of its own)")
    flat = starts.reshape(-1)
    begin = flat.nonzero().flatten()
    cu_seqlens = torch.cat([begin, begin.new_full((1,), flat.numel())]).to(torch.int32)
    return inputs.reshape(1, -1), labels.reshape(1, -1), cu_seqlens


class TextDataset(Dataset):
    """Causal-LM windows over one split of the corpus; item ``i`` is ``(inputs [L], labels [L])`` int64.

    The documents (plays) of the split are tokenised, each followed by ``tokenizer.eos_id``, concatenated
    in order and packed with :func:`pack_causal` (remainder dropped unless ``pad_remainder``).

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"``.
        tokenizer: anything with ``encode(text) -> list[int]`` and ``eos_id`` (see
            :mod:`mcrnn.data.tokenization`); default a :class:`ByteTokenizer`.
        seq_len: L.
        source: ``"gutenberg"`` or ``"sample"`` (see :func:`mcrnn.data.corpus.load_documents`).
        separate_documents: also keep ``starts [N, L]`` (:func:`document_starts`: where each window's documents
            start) and ignore the label of every ``eos`` input (the next document's first token), for training
            with ``cu_seqlens`` (:func:`packed_rows`). Off by default: the windows are then exactly as before.
    """

    def __init__(self, split: str = "train", tokenizer=None, seq_len: int = 512, source: str = "gutenberg",
                 pad_remainder: bool = False, root: str | os.PathLike | None = None, download: bool = True,
                 separate_documents: bool = False):
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        docs = load_documents(split, source, download=download, root=root)
        ids: list[int] = []
        for text in docs.values():
            ids.extend(self.tokenizer.encode(text))
            ids.append(self.tokenizer.eos_id)
        self.tokens = torch.tensor(ids, dtype=torch.long)
        pad = getattr(self.tokenizer, "pad_id", None) if pad_remainder else None
        if pad_remainder and pad is None:
            raise ValueError("pad_remainder=True needs a tokenizer with a pad_id")
        self.inputs, self.labels = pack_causal(self.tokens, seq_len, pad_id=pad)
        self.split, self.seq_len = split, seq_len
        self.starts = None
        if separate_documents:
            eos = self.tokenizer.eos_id
            self.starts = document_starts(self.inputs, eos)
            # a document's last input (its eos) would predict the next document, which it cannot see
            self.labels = self.labels.masked_fill(self.inputs == eos, IGNORE_INDEX)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]
