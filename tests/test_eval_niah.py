"""S-NIAH: the examples (depth, exact length, answers, disjoint splits, seeds), the training batches, the
config checks, the exact-match metric and a --quick run of `mcrnn eval niah` (no network: the sample)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mcrnn.data import IGNORE_INDEX, ByteTokenizer, niah_batch, niah_exact_match, niah_example
from mcrnn.data.niah import EVAL_KEYS, KEYS, TRAIN_KEYS, min_seq_len
from mcrnn.eval.niah import depth_grid
from mcrnn.train.config import validate
from mcrnn.train.data import NIAHBatches, make_batches

SRC = "sample"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\S+)\.")


def _ex(variant=2, seq_len=1024, depth=0.5, seed=0, split="train"):
    return niah_example(variant, seq_len, depth, seed, split, SRC)


@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_depth_and_length(variant, depth):
    for seed in range(5):
        e = _ex(variant, 1024, depth, seed)
        assert len((e["prompt"] + e["answer"]).encode()) == 1024  # exact length in bytes
        assert e["prompt"][e["needle_start"]:].startswith(f"One of the special magic numbers for {e['key']} is: ")
        assert abs(e["needle_start"] / e["haystack_len"] - depth) <= 0.05
        if depth == 0.0:
            assert e["needle_start"] == 0
        if depth == 1.0:  # just before the query
            assert e["prompt"][e["needle_start"]:].split(". ", 1)[1].startswith("The special magic number for ")


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_answer_recoverable_and_format(variant):
    for seed in range(10):
        e = _ex(variant, 600, seed / 9, seed, split="valid")
        found = NEEDLE.findall(e["prompt"])
        assert found == [(e["key"], e["answer"])]  # exactly one needle, holding the answer
        assert e["prompt"].endswith(f"The special magic number for {e['key']} is: ")
        if variant == 3:
            assert UUID.fullmatch(e["answer"])
        else:
            assert re.fullmatch(r"[1-9][0-9]{6}", e["answer"])


def test_train_eval_disjoint():
    assert not set(TRAIN_KEYS) & set(EVAL_KEYS) and len(set(KEYS)) == len(KEYS) >= 90
    train = [_ex(2, 400, 0.5, s, "train") for s in range(20)]
    valid = [_ex(2, 400, 0.5, s, "valid") for s in range(20)]
    assert all(e["key"] in TRAIN_KEYS for e in train) and all(e["key"] in EVAL_KEYS for e in valid)

    def words(e):  # haystack text without the needle and the query
        hay = e["prompt"][:e["needle_start"]] + e["prompt"][e["needle_start"]:].split(". ", 1)[1]
        return hay.rsplit("The special magic number for ", 1)[0]

    # haystacks come from different plays: no long window of a training haystack is in a held-out one
    valid_text = " ".join(words(e) for e in valid)
    for e in train:
        w = words(e)
        assert not any(w[i:i + 40] in valid_text for i in range(0, len(w) - 40, 20))


def test_seeds_reproduce_and_differ():
    for v in (1, 2, 3):
        assert _ex(v, 500, 0.3, 7) == _ex(v, 500, 0.3, 7)
        a, b = _ex(v, 500, 0.3, 7), _ex(v, 500, 0.3, 8)
        assert a["answer"] != b["answer"] and a["prompt"] != b["prompt"]
    x1, y1 = niah_batch([1, 2, 3], 6, 300, seed=4, source=SRC)
    x2, y2 = niah_batch([1, 2, 3], 6, 300, seed=4, source=SRC)
    x3, _ = niah_batch([1, 2, 3], 6, 300, seed=5, source=SRC)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


@pytest.mark.parametrize("label", ["answer", "query"])
def test_batch_labels(label):
    L = 300
    x, y = niah_batch([1, 2, 3], 6, L, seed=0, source=SRC, depths=[0.0, 0.5, 1.0], label=label)
    assert x.shape == y.shape == (6, L) and x.dtype == y.dtype == torch.long
    tok = ByteTokenizer()
    for r in range(6):
        n_ans = 36 if r % 3 == 2 else 7
        lab = (y[r] != IGNORE_INDEX).nonzero().flatten().tolist()
        labelled = tok.decode(y[r, lab])
        answer = labelled[-n_ans:]
        key = NEEDLE.search(tok.decode(x[r])).group(1)
        n_lab = n_ans + (len(f"The special magic number for {key} is: ") if label == "query" else 0)
        assert lab == list(range(L - n_lab, L))  # the last positions predict the (query and) answer
        if label == "query":
            assert labelled == f"The special magic number for {key} is: {answer}"
        # shifted: the input at t is the byte before the label at t; the prompt ends with "is: "
        assert torch.equal(x[r, lab[1:]], y[r, lab[:-1]])
        text = tok.decode(x[r]) + answer[-1]
        assert text.endswith(f"The special magic number for {key} is: " + answer)
        assert NEEDLE.search(text).group(2) == answer
    with pytest.raises(ValueError):
        niah_batch([1], 2, L, seed=0, source=SRC, label="all")


def test_exact_match():
    assert niah_exact_match(["1234567", " 7654321", "1234568"], ["1234567", "7654321", "1234567"]) == 2 / 3
    assert niah_exact_match(["abc"], ["abc"]) == 1.0 and niah_exact_match(["ab"], ["abc"]) == 0.0
    with pytest.raises(ValueError):
        niah_exact_match(["a"], ["a", "b"])
    assert depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0] and len(depth_grid(40)) == 40


def _cfg(**data):
    return validate({"model": {"hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2},
                     "data": {"task": "niah", "seq_len": 256, "source": SRC, "num_eval": 6, **data},
                     "train": {"steps": 2, "warmup": 0, "batch_size": 6}})


def test_niah_batches_determinism():
    cfg = _cfg()
    a, b = make_batches(cfg.data, 0), NIAHBatches(cfg.data, 0)
    assert isinstance(a, NIAHBatches) and a.vocab_size == ByteTokenizer.vocab_size
    for s in (0, 3):
        xa, ya = a.global_batch(s, 6)
        xb, yb = b.global_batch(s, 6)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (6, 256)
    assert not torch.equal(a.global_batch(0, 6)[0], a.global_batch(1, 6)[0])
    assert not torch.equal(make_batches(cfg.data, 1).global_batch(0, 6)[0], a.global_batch(0, 6)[0])
    ex, ey = a.eval_set()
    assert ex.shape == (6, 256) and torch.equal(ey, b.eval_set()[1])
    tok = ByteTokenizer()
    assert all(NEEDLE.search(tok.decode(r)).group(1) in EVAL_KEYS for r in ex)  # held-out keys


@pytest.mark.parametrize("data,field", [
    ({"niah_variants": [1, 4]}, "data.niah_variants"),
    ({"niah_variants": [3], "seq_len": 150}, "data.seq_len"),
    ({"tokenizer": "bpe"}, "data.tokenizer"),
    ({"niah_label": "all"}, "data.niah_label"),
])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        _cfg(**data)
    assert min_seq_len(3) > 150


def test_quick_run(tmp_path):
    from mcrnn.eval import run_task

    torch.manual_seed(0)
    res = run_task("niah", "configs/eval/niah.yaml", out=tmp_path, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == "niah" and [r["variant"] for r in saved["runs"]] == ["attention", "linear", "grm", "ssc"]
    spec = res["config"]["eval"]
    L0 = res["config"]["base"]["data"]["seq_len"]
    want = {(v, m * L0, d) for v in spec["variants"] for m in spec["length_multipliers"]
            for d in depth_grid(spec["depths"])}
    for run in saved["runs"]:
        rows = run["rows"]
        assert {(r["niah"], r["seq_len"], r["depth"]) for r in rows} == want and len(rows) == len(want)
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == spec["examples_per_depth"] for r in rows)


def test_random_keys_are_fresh_and_copied_from_the_needle():
    exs = [niah_example(1, 300, 0.5, s, split, SRC, keys="random") for s in range(20) for split in ("train", "valid")]
    keys = [e["key"] for e in exs]
    assert all(re.fullmatch(r"[a-z]{8}", k) for k in keys) and len(set(keys)) == len(keys)
    assert not set(keys) & set(KEYS)
    for e in exs:
        assert len(e["prompt"] + e["answer"]) == 300
        assert NEEDLE.findall(e["prompt"]) == [(e["key"], e["answer"])]
    assert niah_example(1, 300, 0.5, 3, "train", SRC, keys="random") == niah_example(1, 300, 0.5, 3, "train", SRC,
                                                                                      keys="random")
    with pytest.raises(ValueError, match="keys must be one of"):
        niah_example(1, 300, 0.5, 0, "train", SRC, keys="uuid")
    x, y = niah_batch(1, 4, 200, 0, keys="random")
    texts = [ByteTokenizer().decode(r) for r in x]
    assert all(not any(f" {k} " in t for k in KEYS) for t in texts)
    batches = NIAHBatches(_cfg(niah_keys="random").data, 0)
    assert not torch.equal(batches.global_batch(0, 4)[0], NIAHBatches(_cfg().data, 0).global_batch(0, 4)[0])


def test_teacher_forced_hits_of_an_oracle():
    from mcrnn.eval.niah import teacher_forced_hits

    class Oracle(torch.nn.Module):
        """Ranks the next byte of a fixed row first (its logits know the row)."""

        def __init__(self, row):
            super().__init__()
            self.row, self.w = row, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            T = input_ids.shape[1]
            logits = torch.zeros(input_ids.shape[0], T, 258)
            logits[:, torch.arange(T), self.row[1:T + 1]] = 1.0
            return type("Out", (), {"logits": logits})()

    row = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert teacher_forced_hits(Oracle(row[0]), row, 3, 4).all()
    wrong = row.clone()
    wrong[0, -1] = 0
    assert teacher_forced_hits(Oracle(row[0]), wrong, 3, 4).tolist() == [[True, True, False]]
