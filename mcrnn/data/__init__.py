"""Data for mcrnn: MQAR synthetic recall, S-NIAH needle in a haystack, an offline Shakespeare corpus,
tokenizers and packing.

Importable with torch only (``tokenizers`` is imported when a BPE is trained or loaded). See
``docs/data.md``.
"""

from .corpus import (
    DOC_SEPARATOR,
    TEST_PLAYS,
    VALID_PLAYS,
    download_sdist,
    load_corpus,
    load_documents,
    play_split,
    prepare_corpus,
)
from .mqar import IGNORE_INDEX, MQARDataset, mqar, mqar_accuracy, mqar_splits, mqar_spread, split_seeds
from .niah import niah_batch, niah_exact_match, niah_example
from .packing import TextDataset, pack, pack_causal, pack_remainder
from .paths import data_dir
from .tokenization import BPETokenizer, ByteTokenizer, bpe_path, get_tokenizer, load_bpe, train_bpe

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DOC_SEPARATOR",
    "IGNORE_INDEX",
    "MQARDataset",
    "TEST_PLAYS",
    "TextDataset",
    "VALID_PLAYS",
    "bpe_path",
    "data_dir",
    "download_sdist",
    "get_tokenizer",
    "load_bpe",
    "load_corpus",
    "load_documents",
    "mqar",
    "mqar_accuracy",
    "mqar_splits",
    "mqar_spread",
    "niah_batch",
    "niah_exact_match",
    "niah_example",
    "pack",
    "pack_causal",
    "pack_remainder",
    "play_split",
    "prepare_corpus",
    "split_seeds",
    "train_bpe",
]
