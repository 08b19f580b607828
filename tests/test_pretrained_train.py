"""Post-training Memory Caching on a transformers checkpoint: `mcrnn train` with `train.init_from` and
`train.freeze`, and `mcrnn eval lm|niah --model PATH` (issue 13, part 2).

A tiny random Mamba-2 built locally and saved to a temporary directory (no hub), byte-level text from the
committed sample; a few steps per run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402

import mcrnn.pretrained as mcp  # noqa: E402
from mcrnn.eval.cli import main as eval_main  # noqa: E402
from mcrnn.eval.common import load_model  # noqa: E402
from mcrnn.train import load_config, train, validate  # noqa: E402
from mcrnn.train import trainer as T  # noqa: E402

BYTE_VOCAB = 258


def save_tiny(path: Path, vocab_size: int = 260, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = Mamba2Config(num_heads=4, head_dim=8, hidden_size=16, state_size=8, n_groups=2, num_hidden_layers=2,
                       vocab_size=vocab_size, chunk_size=8, expand=2, conv_kernel=4, pad_token_id=257,
                       bos_token_id=0, eos_token_id=256)
    model = Mamba2ForCausalLM(cfg)
    with torch.no_grad():  # a larger dt than the default init, so the decay matters within a few tokens
        for block in model.backbone.layers:
            block.mixer.dt_bias.uniform_(-1.0, 1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "mamba2")


def raw_config(init_from, out_dir, mc=None, **train) -> dict:
    raw = {"data": {"task": "text", "source": "sample", "seq_len": 32, "num_eval": 4},
           "train": {"init_from": str(init_from), "freeze": "backbone", "steps": 4, "batch_size": 2, "warmup": 1,
                     "lr": 1e-2, "weight_decay": 0.0, "log_every": 1, "eval_every": 2, "progress": False,
                     "threads": 1, "out_dir": str(out_dir), **train}}
    if mc is not False:
        raw["memory_caching"] = mc or {"aggregation": "grm", "segment_size": 8}
    return raw


def losses(out_dir) -> list[float]:
    with open(Path(out_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def initial_model(cfg):
    """The model a run starts from (the trainer seeds torch before building it)."""
    torch.manual_seed(cfg.train.seed)
    return T.build_run_model(cfg, BYTE_VOCAB)


# --- training ---------------------------------------------------------------------------------------------


def test_frozen_backbone_trains_only_u_proj(tiny_path, tmp_path):
    cfg = validate(raw_config(tiny_path, tmp_path / "run"))
    start = initial_model(cfg)
    trainable = {n for n, p in start.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.layers.{i}.mixer.u_proj.weight" for i in range(2)}
    assert sum(len(g["params"]) for g in T.make_optimizer(start, cfg.train).param_groups) == 2

    res = train(cfg)
    assert res["step"] == 4 and res["trainable_params"] == 2 * 16 * 4 * 8
    ckpt = T.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert len(ckpt["optimizer"]["state"]) == 2  # AdamW state for the two u_proj weights only
    before = start.state_dict()
    for name, value in ckpt["model"].items():
        if ".u_proj." in name:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))


def test_full_finetune_from_a_plain_checkpoint(tiny_path, tmp_path):
    """freeze: none, no memory_caching: the plain checkpoint trains as it is, every parameter moves."""
    cfg = validate(raw_config(tiny_path, tmp_path / "ft", mc=False, freeze="none", steps=2, eval_every=0))
    before = initial_model(cfg).state_dict()
    train(cfg)
    after = T.load_checkpoint(tmp_path / "ft" / "ckpt.pt")["model"]
    assert "backbone.layers.0.mixer.u_proj.weight" not in after
    assert all(not torch.equal(after[n], v) for n, v in before.items() if n.endswith("in_proj.weight"))
    saved = Mamba2ForCausalLM.from_pretrained(tmp_path / "ft" / "pretrained")
    assert torch.equal(saved.state_dict()["backbone.embeddings.weight"], after["backbone.embeddings.weight"])


def test_resume_is_bit_exact_and_the_result_loads_with_mc(tiny_path, tmp_path):
    mc = {"aggregation": "ssc", "segment_size": 8, "top_k": 2, "init": "independent"}
    full = validate(raw_config(tiny_path, tmp_path / "full", mc=mc, steps=6))
    train(full)
    cut = validate(raw_config(tiny_path, tmp_path / "cut", mc=mc, steps=6))
    train(cut, stop_at=3)
    assert not (tmp_path / "cut" / "pretrained").exists()  # written at the end of the schedule only
    train(cut, resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a = T.load_checkpoint(tmp_path / "full" / "ckpt.pt")["model"]
    b = T.load_checkpoint(tmp_path / "cut" / "ckpt.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    loaded = mcp.from_pretrained(tmp_path / "cut" / "pretrained")
    assert type(loaded) is Mamba2ForCausalLM
    assert mcp.memory_caching_settings(loaded) == mcp.MCSettings(**mc)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], b[k]) for k in b)
    # the eval suite's loader rebuilds the run from init_from + memory_caching and gets the same model
    model, cfg = load_model(tmp_path / "cut")
    x = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x).logits, loaded.eval()(x).logits)
    assert cfg.memory_caching["aggregation"] == "ssc"


def test_a_saved_mc_model_continues_training(tiny_path, tmp_path):
    """init_from a checkpoint saved with MC: its settings and trained u_proj come along."""
    first = validate(raw_config(tiny_path, tmp_path / "a", steps=2, eval_every=0))
    train(first)
    again = validate(raw_config(tmp_path / "a" / "pretrained", tmp_path / "b", mc=False, steps=2, eval_every=0))
    start = initial_model(again).state_dict()
    trained = T.load_checkpoint(tmp_path / "a" / "ckpt.pt")["model"]
    assert all(torch.equal(start[k], trained[k]) for k in trained)
    train(again)
    assert mcp.memory_caching_settings(mcp.from_pretrained(tmp_path / "b" / "pretrained")).aggregation == "grm"


# --- errors name the field --------------------------------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    ({"model": {"hidden_size": 32}}, "model.hidden_size"),
    ({"memory_caching": {"aggregation": "max", "segment_size": 8}}, "memory_caching.aggregation"),
    ({"memory_caching": {"aggregation": "grm"}}, "memory_caching.segment_size"),
    ({"memory_caching": {"aggregation": "grm", "segment_size": 8, "topk": 2}}, "memory_caching.topk"),
    ({"memory_caching": {"aggregation": "ssc", "segment_size": 8}}, "memory_caching.top_k"),
    ({"memory_caching": {"aggregation": "grm", "segment_size": 0}}, "memory_caching.segment_size"),
    ({"memory_caching": {"aggregation": "mean", "segment_size": 8}}, "train.freeze"),
    ({"memory_caching": {"aggregation": "residual", "segment_size": 8}}, "train.freeze"),
    ({"memory_caching": {"aggregation": "grm", "segment_size": 8, "use_u": False}}, "train.freeze"),
    ({"train": {"freeze": "all"}}, "train.freeze"),
    ({"train": {"init_from": "/nonexistent/ckpt"}}, "train.init_from"),
])
def test_bad_settings_name_the_field(tiny_path, tmp_path, change, field):
    raw = raw_config(tiny_path, tmp_path / "bad")
    for sec, kv in change.items():
        raw[sec] = {**raw.get(sec, {}), **kv} if sec == "train" else kv
    with pytest.raises(ValueError, match="^" + re.escape(field) + r"\b"):
        validate(raw)


def test_mcrnn_models_refuse_pretrained_only_settings(tmp_path):
    with pytest.raises(ValueError, match=r"^memory_caching: only read with train\.init_from"):
        validate({"memory_caching": {"aggregation": "grm", "segment_size": 8}})
    with pytest.raises(ValueError, match=r"^train\.freeze: 'backbone' needs train\.init_from"):
        validate({"train": {"freeze": "backbone"}})


def test_mean_needs_no_training_and_says_so(tiny_path, tmp_path):
    with pytest.raises(ValueError, match=r"train\.freeze: 'backbone' leaves nothing to train: aggregation 'mean'"):
        load_config(None, raw_config(tiny_path, tmp_path / "m", mc={"aggregation": "mean", "segment_size": 8}))


def test_errors_found_once_the_checkpoint_is_read(tiny_path, tmp_path):
    # a vocabulary smaller than the byte tokenizer's 258 ids
    small = save_tiny(tmp_path / "small", vocab_size=64)
    with pytest.raises(ValueError, match=r"^data\.tokenizer: the 'byte' tokenizer has 258 tokens .* vocab_size=64"):
        train(validate(raw_config(small, tmp_path / "v")))
    # freeze: backbone on a plain checkpoint with no MC settings to add
    with pytest.raises(ValueError, match=r"^train\.freeze: 'backbone' trains only Memory Caching parameters"):
        train(validate(raw_config(tiny_path, tmp_path / "p", mc=False)))
    # a checkpoint saved with MC keeps its settings
    train(validate(raw_config(tiny_path, tmp_path / "g", steps=1, eval_every=0)))
    with pytest.raises(ValueError, match=r"^memory_caching: .* was saved with Memory Caching"):
        train(validate(raw_config(tmp_path / "g" / "pretrained", tmp_path / "h",
                                  mc={"aggregation": "grm", "segment_size": 16})))
    # resuming with another freeze would change which parameters the optimizer holds
    with pytest.raises(ValueError, match=r"^train\.freeze: differs from the checkpoint's"):
        train(validate(raw_config(tiny_path, tmp_path / "g", steps=1, eval_every=0, freeze="none")), resume=True)


# --- evaluation of a checkpoint ---------------------------------------------------------------------------


def _results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def test_eval_lm_with_and_without_mc(tiny_path, tmp_path, capsys):
    out = tmp_path / "lm"
    # quick: windows of L = 64 and 128; MC mean over independent segments of 64 = the base model within L
    rc = eval_main(["lm", "--model", str(tiny_path), "--quick", "--out", str(out), "--mc.aggregation=mean",
                    "--mc.segment_size=64", "--mc.init=independent", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    res = _results(out)
    runs = {r["variant"]: r for r in res["runs"]}
    assert set(runs) == {"no_mc", "mc"} and runs["no_mc"]["memory_caching"] is None
    assert runs["mc"]["memory_caching"]["aggregation"] == "mean"
    ppl = {v: {r["seq_len"]: r["value"] for r in runs[v]["rows"] if r["metric"] == "ppl_extrapolation"}
           for v in runs}
    assert set(ppl["no_mc"]) == {64, 128} and all(p > 1 for p in ppl["no_mc"].values())
    assert ppl["mc"][64] == pytest.approx(ppl["no_mc"][64], rel=1e-5)
    assert abs(ppl["mc"][128] - ppl["no_mc"][128]) > 1e-6 * ppl["no_mc"][128]  # MC reads two segments there
    assert "no_mc: ppl 64:" in capsys.readouterr().out


def test_eval_niah_on_a_saved_mc_model(tiny_path, tmp_path):
    train(validate(raw_config(tiny_path, tmp_path / "run", steps=1, eval_every=0)))
    out = tmp_path / "niah"
    assert eval_main(["niah", "--model", str(tmp_path / "run" / "pretrained"), "--quick", "--out", str(out)]) == 0
    runs = {r["variant"]: r for r in _results(out)["runs"]}
    assert runs["mc"]["memory_caching"]["aggregation"] == "grm" and runs["no_mc"]["memory_caching"] is None
    for r in runs.values():
        assert len(r["rows"]) == 2 and all(0 <= row["accuracy"] <= 1 for row in r["rows"])


def test_eval_model_errors(tiny_path, tmp_path, capsys):
    assert eval_main(["lm", "--model", str(tmp_path / "missing"), "--quick", "--out", str(tmp_path / "x")]) == 2
    assert "--model: " in capsys.readouterr().err
    assert eval_main(["lm", "--model", str(tiny_path), "--quick", "--out", str(tmp_path / "x"),
                      "--mc.aggregation=ssc", "--mc.segment_size=8"]) == 2
    assert "--mc.top_k: " in capsys.readouterr().err
    assert eval_main(["mqar", "--model", str(tiny_path)]) == 2
    assert "--model works with the tasks lm, niah" in capsys.readouterr().err
    assert eval_main(["lm", "--quick", "--mc.aggregation=mean"]) == 2
    assert "--mc.* settings need --model" in capsys.readouterr().err
    small = save_tiny(tmp_path / "small", vocab_size=64)
    assert eval_main(["lm", "--model", str(small), "--quick", "--out", str(tmp_path / "y")]) == 2
    assert "data.tokenizer: the 'byte' tokenizer has 258 tokens" in capsys.readouterr().err
