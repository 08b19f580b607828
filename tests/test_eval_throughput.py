"""The throughput task (quick run, rows and ratios) and the lm-evaluation-harness adapter's scoring core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcrnn import MCConfig, MCForCausalLM
from mcrnn.data.tokenization import ByteTokenizer
from mcrnn.eval import throughput
from mcrnn.eval.lm_eval_adapter import (
    encode_pair,
    generate_text,
    rolling_loglikelihood,
    score_continuations,
    score_token_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "eval" / "throughput.yaml"


# --- throughput --------------------------------------------------------------------------------------------


def test_quick_run_writes_rows_with_consistent_ratios(tmp_path):
    import mcrnn.eval as E

    res = E.run_task("throughput", CONFIG, out=tmp_path, quick=True, threads=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    for key in ("command", "commit", "machine", "wall_seconds", "eval"):
        assert key in saved
    spec = saved["eval"]
    rows = {(r["variant"], r["seq_len"]): r for r in saved["rows"]}
    assert set(rows) == {(v, T) for v in spec["variants"] for T in spec["seq_lens"]}
    for r in rows.values():
        assert set(throughput.ROW_KEYS) <= set(r)
        assert not r.get("skipped") and not r.get("error"), r
        for k in ("train_tokens_per_s", "decode_tokens_per_s", "peak_mb", "params"):
            assert r[k] > 0, (k, r)
        att = rows[("attention", r["seq_len"])]
        assert r["ratio_train_vs_attention"] == pytest.approx(r["train_tokens_per_s"] / att["train_tokens_per_s"])
        # no `aggregation: none` linear variant in the quick run: no base to compare with
        assert r["ratio_train_vs_base"] is None
    assert rows[("attention", 64)]["ratio_train_vs_attention"] == pytest.approx(1.0)


def test_ratios_base_and_attention():
    models = {"attention": {"mixer": "attention"}, "linear": {"memory": "linear", "aggregation": "none"},
              "grm": {"memory": "linear"}, "dla_grm": {"memory": "dla", "aggregation": "grm"}}
    rows = [{"variant": v, "seq_len": 8, "train_tokens_per_s": s}
            for v, s in (("attention", 100.0), ("linear", 200.0), ("grm", 50.0), ("dla_grm", 10.0))]
    rows.append({"variant": "grm", "seq_len": 16, "train_tokens_per_s": None, "skipped": "too slow"})
    throughput.add_ratios(rows, models)
    r = {(x["variant"], x["seq_len"]): x for x in rows}
    assert r[("grm", 8)]["ratio_train_vs_base"] == pytest.approx(0.25)  # aggregation defaults to grm
    assert r[("grm", 8)]["ratio_train_vs_attention"] == pytest.approx(0.5)
    assert r[("linear", 8)]["ratio_train_vs_base"] == pytest.approx(1.0)
    assert r[("attention", 8)]["ratio_train_vs_base"] is None
    assert r[("dla_grm", 8)]["ratio_train_vs_base"] is None  # no dla base in this run
    assert r[("grm", 16)]["ratio_train_vs_attention"] is None


def test_case_over_its_time_limit_is_skipped():
    case = {"variant": "attention", "seq_len": 16, "model": {"mixer": "attention", "hidden_size": 16,
            "num_hidden_layers": 1, "num_heads": 2}, "batch_size": 1, "runs": 1, "n_decode": 1,
            "decode_batch": 1, "threads": 1}
    import time

    res = throughput.measure_case(case, deadline=time.time() - 1)
    assert "skipped" in res and res["params"] > 0


def test_full_config_is_valid():
    from mcrnn.eval import load_experiment

    exp = load_experiment(CONFIG, "throughput")
    spec = throughput.eval_spec(exp)
    cases = throughput.make_cases(exp, spec)
    assert len(cases) == len(exp.variants) * len(spec["seq_lens"]) == 39  # 13 variants x 3 lengths
    for c in cases:
        MCConfig(**c["model"])  # every (variant, length) builds
    params = {c["variant"]: sum(p.numel() for p in MCForCausalLM(MCConfig(**c["model"])).parameters())
              for c in cases if c["seq_len"] == 256}
    assert all(1e6 <= p <= 5e6 for p in params.values()), params


# --- lm-eval adapter: scoring core (no lm_eval needed) -----------------------------------------------------


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_heads=2, segment_size=8, mini_batch=2)
    cfg.update(kw)
    model = MCForCausalLM(MCConfig(**cfg)).eval()
    with torch.no_grad():  # sharper distributions than the init, so greedy checks are not ties
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def direct_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(x).logits.float(), -1)[0]
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    target = torch.tensor(cont)
    return logp[pos, target].sum().item(), bool((logp[pos].argmax(-1) == target).all())


@pytest.mark.parametrize("mixer", ["mc", "attention"])
def test_score_continuations_matches_direct_forward(mixer):
    model, tok = tiny_model(mixer=mixer), ByteTokenizer()
    pairs = [("The cat sat on", " the mat"), ("abc", "d"), ("", "hello"), ("xyz ", "w"), ("The cat sat", " on")]
    got = score_continuations(model, tok, pairs, batch_size=3)
    for (c, x), (lp, greedy) in zip(pairs, got):
        ctx, cont = encode_pair(tok, c, x)
        want_lp, want_greedy = direct_logprob(model, ctx, cont)
        assert lp == pytest.approx(want_lp, rel=1e-4, abs=1e-4)
        assert greedy == want_greedy
    assert encode_pair(tok, "", "hi") == ([tok.eos_id], list(b"hi"))
    assert encode_pair(tok, "xyz ", "w") == (list(b"xyz"), list(b" w"))


def test_greedy_flag_true_for_the_argmax_continuation():
    model = tiny_model()
    ctx = [1, 2, 3, 4]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
        other = (nxt + 1) % 258
    (lp_g, g), (lp_o, o) = score_token_pairs(model, [(ctx, [nxt]), (ctx, [other])])
    assert g and not o and lp_g > lp_o


@pytest.mark.parametrize("mixer", ["attention", "mc"])
def test_rolling_loglikelihood_equals_full_sequence(mixer):
    model = tiny_model(mixer=mixer)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (50,), generator=g).tolist()
    eos = 256
    x = torch.tensor([[eos] + ids])
    with torch.no_grad():
        logp = F.log_softmax(model(x).logits.float(), -1)[0]
    full = logp[torch.arange(len(ids)), x[0, 1:]].sum().item()
    got = rolling_loglikelihood(model, ids, max_len=16, prefix_token=eos)  # 4 windows carrying the cache
    assert got == pytest.approx(full, rel=1e-4)
    # one window covering the text: the harness's windows are the full sequence as well
    assert rolling_loglikelihood(model, ids, max_len=64, prefix_token=eos, mode="windows") == pytest.approx(
        full, rel=1e-4)
    # disjoint windows: each window only sees itself
    win = 0.0
    for s in range(1, len(ids) + 1, 16):
        xs = x[:, s - 1:min(s + 16, len(ids) + 1)]
        with torch.no_grad():
            lp = F.log_softmax(model(xs[:, :-1]).logits.float(), -1)[0]
        win += lp[torch.arange(xs.shape[1] - 1), xs[0, 1:]].sum().item()
    assert rolling_loglikelihood(model, ids, max_len=16, prefix_token=eos, mode="windows") == pytest.approx(
        win, rel=1e-4)


def test_generate_text_greedy_and_stop_strings():
    model, tok = tiny_model(), ByteTokenizer()
    full = generate_text(model, tok, "ab", max_new_tokens=12)
    with torch.no_grad():  # greedy reference: the full forward at every step
        ids = tok.encode("ab")
        for _ in range(12):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
    assert full == tok.decode(ids[2:])
    if len(full) > 3:
        stop = full[2:4]
        cut = generate_text(model, tok, "ab", until=[stop], max_new_tokens=12)
        assert cut == full[: full.index(stop)]


# --- lm-eval adapter: lazy import and the harness ----------------------------------------------------------


def test_mcrnn_eval_does_not_import_lm_eval():
    code = ("import sys, mcrnn.eval, mcrnn.eval.lm_eval_adapter, mcrnn.eval.throughput; "
            "print(any(m == 'lm_eval' or m.startswith('lm_eval.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_harness_model_class(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from mcrnn.eval.lm_eval_adapter import MCRNNLM

    assert get_model("mcrnn") is MCRNNLM
    model = tiny_model()
    model.save_pretrained(tmp_path)
    lm = MCRNNLM.create_from_arg_string(f"path={tmp_path},tokenizer=byte,max_length=64", {"batch_size": 2})
    reqs = [Instance("loglikelihood", {}, ("The cat", " sat"), 0), Instance("loglikelihood", {}, ("a", "b"), 1)]
    got = lm.loglikelihood(reqs)
    want = score_continuations(model, ByteTokenizer(), [r.args for r in reqs])
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-4)
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some longer text " * 8,), 0)])
    assert roll[0] < 0
    gen = lm.generate_until([Instance("generate_until", {}, ("ab", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(gen[0], str) and len(gen[0].encode()) <= 5 * 4
