"""Single needle in a haystack (S-NIAH), RULER-style, built offline at the byte level.

An example is one ASCII string of an exact length, ``prompt + answer``::

    <haystack, first part> One of the special magic numbers for {key} is: {value}. <haystack, rest>
    The special magic number for {key} is: {value}

- variant 1 (S-NIAH-1): a 7-digit number in a repeated filler sentence (:data:`FILLER`);
- variant 2 (S-NIAH-2): a 7-digit number in natural text (the Shakespeare corpus of :mod:`mcrnn.data.corpus`,
  whitespace collapsed to single spaces);
- variant 3 (S-NIAH-3): a UUID (lowercase ``8-4-4-4-12`` hex, version 4, drawn from a seeded
  ``torch.Generator``) in natural text.

The needle sentence starts at a word boundary close to ``depth`` times the haystack's length (``depth = 0``:
the start, ``1``: just before the query). The haystack is trimmed so that ``len(prompt + answer)`` is exactly
``seq_len`` bytes: a batch of examples of one variant and length needs no padding.

Train / held-out disjointness: ``split="train"`` takes its keys from :data:`TRAIN_KEYS` and its haystacks from
the corpus' train plays; any other split takes :data:`EVAL_KEYS` (disjoint from the training keys) and that
split's plays. S-NIAH-1 has one filler for every split, so its examples differ by key (and value).
With ``keys="random"`` every example draws a fresh key of :data:`RANDOM_KEY_LEN` random lowercase letters
instead (26**8 keys: no key is seen twice), so the key bytes of the query can only be copied from the needle,
never recalled from training.

:func:`niah_batch` gives training tensors with the convention of :mod:`mcrnn.data` (labels already shifted,
``-100`` ignored): the answer bytes are labelled, and with ``label="query"`` (the default) the query's bytes
too. The query repeats the needle's wording ("... for {key} is: "), so the key bytes in it are predictable only
by copying from the needle: a dense signal for learning the induction (copy) head that the answer needs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch

from .corpus import load_documents
from .mqar import IGNORE_INDEX
from .tokenization import ByteTokenizer

VARIANTS = (1, 2, 3)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUERY = "The special magic number for {key} is: "

# common nouns and adjective-noun pairs; every fifth one is held out for evaluation (see EVAL_KEYS)
KEYS = (
    "apple", "river", "garden", "window", "mountain", "candle", "bicycle", "teacher", "forest", "pencil",
    "harbor", "blanket", "kitchen", "lantern", "meadow", "violin", "captain", "island", "mirror", "orchard",
    "pebble", "rocket", "saddle", "tunnel", "village", "wagon", "anchor", "basket", "castle", "dolphin",
    "engine", "falcon", "glacier", "hammer", "jacket", "kettle", "ladder", "magnet", "needle", "oyster",
    "parrot", "quilt", "ribbon", "spider", "tomato", "umbrella", "valley", "walnut", "yogurt", "zipper",
    "red-balloon", "quiet-library", "golden-coin", "silver-spoon", "broken-clock", "sleepy-cat",
    "crowded-market", "frozen-lake", "ancient-temple", "tiny-robot", "brave-knight", "dusty-attic",
    "empty-bottle", "gentle-breeze", "hungry-wolf", "lucky-horseshoe", "narrow-bridge", "old-lighthouse",
    "purple-flower", "rusty-nail", "shiny-button", "tall-giraffe", "warm-bread", "wooden-chair",
    "bright-comet", "calm-ocean", "dark-cellar", "fast-train", "green-turtle", "heavy-stone",
    "icy-road", "loud-thunder", "noisy-parade", "open-door", "proud-peacock", "soft-pillow",
    "sweet-honey", "white-swan", "wild-horse", "young-oak", "blue-whale", "clever-fox", "deep-well",
    "fresh-mint", "grand-piano", "little-star", "misty-hill", "paper-boat", "secret-map", "summer-rain",
)
EVAL_KEYS = KEYS[4::5]
TRAIN_KEYS = tuple(k for i, k in enumerate(KEYS) if i % 5 != 4)

KEY_KINDS = ("words", "random")
RANDOM_KEY_LEN = 8
_TOK = ByteTokenizer()
_SENTENCE_END = ".!?;:"


def _check(variant: int, seq_len: int, depth: float) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")


@functools.lru_cache(maxsize=8)
def _corpus_stream(split: str, source: str) -> str:
    """The plays of ``split`` as one ASCII line: whitespace collapsed (Shakespeare's verse indentation would
    spend most bytes on spaces), anything outside printable ASCII replaced, so one char is one byte."""
    text = " ".join(load_documents(split, source).values())
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    if not text:
        raise ValueError(f"no text in split {split!r} of source {source!r}")
    return text + " "


def _window(stream: str, length: int, gen: torch.Generator) -> str:
    """``length`` chars of ``stream`` (repeated when shorter) ending at a random word end, so the query that
    follows is not glued to a cut word; the window may start mid-word, like any packed LM window."""
    if length <= 0:
        return ""
    n = len(stream)
    text = stream * (-(-length // n) + 1)  # room for `length` chars before any end in the last copy
    end = len(text) - n + int(torch.randint(0, n, (1,), generator=gen))
    while text[end - 1] != " ":  # the stream ends with a space, so this stops within the text
        end += 1
    return text[end - length:end]


def _value(variant: int, gen: torch.Generator) -> str:
    if variant == 3:
        d = torch.randint(0, 16, (32,), generator=gen).tolist()
        d[12] = 4  # version 4
        d[16] = 8 + d[16] % 4  # RFC 4122 variant bits 10xx
        h = "".join("0123456789abcdef"[i] for i in d)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    first = int(torch.randint(1, 10, (1,), generator=gen))  # 7 digits: no leading zero
    rest = torch.randint(0, 10, (6,), generator=gen).tolist()
    return str(first) + "".join(str(i) for i in rest)


def _boundary(hay: str, target: int) -> int:
    """The insertion point nearest ``target``: prefer a sentence start within a small window, else a word
    start, else ``target`` itself. 0 and ``len(hay)`` are always allowed."""
    n = len(hay)
    if target <= 0 or target >= n:
        return max(0, min(target, n))
    tol = max(8, n // 40)
    best_word = best_sent = None
    for p in range(max(0, target - tol), min(n, target + tol) + 1):
        word = p == 0 or p == n or hay[p - 1] == " "
        if not word:
            continue
        d = abs(p - target)
        if best_word is None or d < abs(best_word - target):
            best_word = p
        sent = p == 0 or p == n or (p >= 2 and hay[p - 2] in _SENTENCE_END)
        if sent and (best_sent is None or d < abs(best_sent - target)):
            best_sent = p
    if best_sent is not None:
        return best_sent
    return best_word if best_word is not None else target


def min_seq_len(variant: int) -> int:
    """The shortest ``seq_len`` of :func:`niah_example` for ``variant`` (an empty haystack, the longest key)."""
    key = max(KEYS, key=len)
    value = "0" * (36 if variant == 3 else 7)
    return len(NEEDLE.format(key=key, value=value)) + 1 + len(QUERY.format(key=key)) + len(value)


def _random_key(seed: int, split: str) -> str:
    """A key of random lowercase letters from its own generator: train and held-out splits draw from disjoint
    seeds (even and odd), so the same example seed gives different keys in the two."""
    gen = torch.Generator().manual_seed((2 * int(seed) + (split != "train")) % (1 << 31))
    return "".join(chr(ord("a") + i) for i in torch.randint(0, 26, (RANDOM_KEY_LEN,), generator=gen).tolist())


def niah_example(variant: int, seq_len: int, depth: float, seed: int, split: str = "train",
                 source: str = "sample", keys: str = "words") -> dict:
    """One S-NIAH example whose ``prompt + answer`` is exactly ``seq_len`` bytes.

    Args:
        variant: 1 (number in filler), 2 (number in natural text), 3 (UUID in natural text).
        seq_len: total bytes of prompt and answer; must leave room for the needle, query and answer.
        depth: where the needle goes, in ``[0, 1]`` of the haystack.
        seed: the example's generator seed (key, value, haystack window); same seed, same example.
        split: ``"train"`` (training keys and plays) or ``"valid"``/``"test"`` (held-out keys and plays).
        source: corpus of variants 2 and 3, ``"sample"`` or ``"gutenberg"``.
        keys: ``"words"`` (the split's word keys) or ``"random"`` (a fresh random key per example).

    Returns ``{"prompt", "answer", "key", "value", "needle_start", "haystack_len", "depth", "variant"}``:
    ``needle_start`` is the byte offset of the needle sentence in ``prompt``, ``haystack_len`` the bytes of
    haystack around it (so ``needle_start / haystack_len`` is the depth actually used).
    """
    _check(variant, seq_len, depth)
    if keys not in KEY_KINDS:
        raise ValueError(f"keys must be one of {list(KEY_KINDS)}, got {keys!r}")
    gen = torch.Generator().manual_seed(int(seed) % (1 << 31))  # the CPU generator keeps 32 bits
    if keys == "random":
        key = _random_key(seed, split)
    else:
        pool = TRAIN_KEYS if split == "train" else EVAL_KEYS
        key = pool[int(torch.randint(0, len(pool), (1,), generator=gen))]
    value = _value(variant, gen)
    needle = NEEDLE.format(key=key, value=value) + " "
    query = QUERY.format(key=key)
    h = seq_len - len(needle) - len(query) - len(value)
    if h < 0:
        raise ValueError(f"seq_len={seq_len} is too short for S-NIAH-{variant}: the needle, query and answer "
                         f"alone take {seq_len - h} bytes")
    if variant == 1:
        # end after a random sentence of the filler, so examples do not all begin alike
        starts = [0] + [m.end() for m in re.finditer(r"\. ", FILLER)][:-1]
        s = starts[int(torch.randint(0, len(starts), (1,), generator=gen))]
        rotated = FILLER[s:] + FILLER[:s]  # ends at a sentence end
        hay = (rotated * (h // len(FILLER) + 1))[len(rotated) * (h // len(FILLER) + 1) - h:]
    else:
        hay = _window(_corpus_stream(split, source), h, gen)
    pos = _boundary(hay, round(float(depth) * h))
    prompt = hay[:pos] + needle + hay[pos:] + query
    assert len(prompt) + len(value) == seq_len
    return {"prompt": prompt, "answer": value, "key": key, "value": value, "needle_start": pos,
            "haystack_len": h, "depth": float(depth), "variant": variant}


def niah_tensor(examples: Sequence[dict]) -> torch.Tensor:
    """``[N, S]`` int64 bytes of ``prompt + answer`` of examples of one total length ``S``."""
    rows = [_TOK.encode(e["prompt"] + e["answer"]) for e in examples]
    if len({len(r) for r in rows}) > 1:
        raise ValueError("examples have different lengths")
    return torch.tensor(rows, dtype=torch.long)


def niah_batch(variants: int | Sequence[int], num: int, seq_len: int, seed: int, split: str = "train",
               source: str = "sample", depths: Sequence[float] | None = None,
               label: str = "query", keys: str = "words") -> tuple[torch.Tensor, torch.Tensor]:
    """Training tensors ``(inputs [num, seq_len], labels [num, seq_len])`` int64.

    Each row is an example of ``seq_len + 1`` bytes: ``inputs = bytes[:-1]``, ``labels = bytes[1:]`` with
    every position but the answer's (``label="answer"``) or the query's and the answer's (``label="query"``)
    set to ``-100`` (the logits at ``t`` are scored against ``labels[t]``, so the last ``len(answer)``
    positions predict the answer). ``keys`` as in :func:`niah_example`. Row ``i`` is of variant
    ``variants[i % len]`` (an equal mix) and depth ``depths[i % len]``, or a uniform random depth when
    ``depths`` is None. A pure function of its arguments: every row's seed comes from a generator seeded with ``seed``.
    """
    vs = [variants] if isinstance(variants, int) else list(variants)
    if label not in ("answer", "query"):
        raise ValueError(f"label must be 'answer' or 'query', got {label!r}")
    if not vs:
        raise ValueError("variants must not be empty")
    if not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")
    gen = torch.Generator().manual_seed(int(seed) % (1 << 31))
    row_seeds = torch.randint(0, 1 << 31, (num,), generator=gen).tolist()
    row_depths = torch.rand(num, generator=gen, dtype=torch.float64).tolist() if depths is None else \
        [float(depths[i % len(depths)]) for i in range(num)]
    inputs = torch.empty(num, seq_len, dtype=torch.long)
    labels = torch.full((num, seq_len), IGNORE_INDEX, dtype=torch.long)
    for i in range(num):
        ex = niah_example(vs[i % len(vs)], seq_len + 1, row_depths[i], row_seeds[i], split, source, keys)
        row = niah_tensor([ex])[0]
        inputs[i] = row[:-1]
        a = len(ex["answer"]) + (len(QUERY.format(key=ex["key"])) if label == "query" else 0)
        labels[i, -a:] = row[-a:]
    return inputs, labels


def niah_exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of predictions equal to their answer (surrounding whitespace ignored)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers, strict=True)) / len(answers)
