"""Tokenizers: a byte-level one (no training, no files) and a byte-level BPE trained with ``tokenizers``.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and ``eos_id``, which is
what :class:`mcrnn.data.packing.TextDataset` needs. ``tokenizers`` is imported lazily, so the rest of
:mod:`mcrnn.data` works with torch only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .paths import data_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids ``0 … 255`` are the bytes, then the specials ``eos = 256``, ``pad = 257``.

    ``vocab_size = 258``. Round-trips any text exactly (``decode(encode(s)) == s``); ``decode`` drops
    special ids and replaces invalid UTF-8 byte runs (e.g. from a model's samples) with U+FFFD.
    """

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A thin wrapper of a ``tokenizers.Tokenizer`` (byte-level BPE); build with :func:`train_bpe`."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS_TOKEN)
        self.pad_id = tok.token_to_id(PAD_TOKEN)
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"tokenizer lacks the special tokens {EOS_TOKEN!r} / {PAD_TOKEN!r}")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path))


def bpe_path(vocab_size: int, root: str | os.PathLike | None = None) -> Path:
    """Cache file of the corpus BPE with ``vocab_size``: ``<data_dir>/bpe-<vocab_size>.json``."""
    return (Path(root) if root is not None else data_dir()) / f"bpe-{vocab_size}.json"


def train_bpe(text: str | Iterable[str], vocab_size: int, save_path: str | os.PathLike | None = None,
              min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) on ``text``.

    Args:
        text: a string or an iterable of strings (documents).
        vocab_size: total size including the 256 byte symbols and the 2 specials (``eos``, ``pad``); must
            be ``>= 258``. Training stops early when no pair reaches ``min_frequency`` (small corpora), so
            the result may be smaller: read ``.vocab_size``.
        save_path: if given, the tokenizer JSON is written there (load it back with :func:`load_bpe`).

    Everything is local: no hub download. Decoding round-trips any text exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + 2 specials), got {vocab_size!r}")
    docs = [text] if isinstance(text, str) else list(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    out = BPETokenizer(tok)
    if save_path is not None:
        out.save(save_path)
    return out


def load_bpe(path: str | os.PathLike) -> BPETokenizer:
    """Load a tokenizer saved by :func:`train_bpe`."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; build it with mcrnn.data.prepare_corpus()")
    return BPETokenizer(Tokenizer.from_file(str(path)))


def get_tokenizer(name: str = "byte", vocab_size: int = 8192, root: str | os.PathLike | None = None):
    """``"byte"`` → :class:`ByteTokenizer`; ``"bpe"`` → the cached corpus BPE of ``vocab_size``."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return load_bpe(bpe_path(vocab_size, root))
    raise ValueError(f"name must be 'byte' or 'bpe', got {name!r}")
