"""Tests of mcrnn.train: config checks, exact resume, DDP equivalence, atomic and finite checkpoints, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mcrnn.train import load_config, lr_factor, parse_overrides, train, validate
from mcrnn.train import trainer as T
from mcrnn.train.data import make_batches

ROOT = Path(__file__).resolve().parents[1]

# a model and task small enough for a few steps per second on one CPU core
TINY = {
    "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "aggregation": "grm",
              "segment_size": 8, "intermediate_size": 32},
    "data": {"task": "mqar_spread", "seq_len": 32, "vocab_size": 32, "num_kv_pairs": 4, "num_eval": 16},
    "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup": 2, "log_every": 1, "eval_every": 3,
              "eval_batch_size": 8, "progress": False, "threads": 1},
}


def tiny(tmp_path, name="run", **sections) -> dict:
    raw = json.loads(json.dumps(TINY))
    for sec, kv in sections.items():
        raw[sec].update(kv)
    raw["train"]["out_dir"] = str(tmp_path / name)
    return raw


def metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir) -> list[float]:
    return [r["loss"] for r in metrics(out_dir) if "loss" in r]


def final_params(out_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


# --- config -----------------------------------------------------------------------------------------------


def test_overrides_are_yaml_and_floats_accept_exponents():
    over = parse_overrides(["--train.lr=1e-3", "--model.mixer", "[mc, attention]", "--train.progress=false"])
    assert over == {"train": {"lr": "1e-3", "progress": False}, "model": {"mixer": ["mc", "attention"]}}
    cfg = load_config(None, ["--train.lr=1e-3", "--train.steps=5", "--train.warmup=1"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float) and cfg.train.steps == 5


@pytest.mark.parametrize("override, field", [
    ("--train.stepz=3", "train.stepz"),
    ("--train.lr=-1", "train.lr"),
    ("--train.lr=fast", "train.lr"),
    ("--train.batch_size=1.5", "train.batch_size"),
    ("--train.steps=true", "train.steps"),
    ("--data.task=sudoku", "data.task"),
    ("--data.num_kv_pairs=100", "data.num_kv_pairs"),
    ("--model.hidden_size=big", "model.hidden_size"),
    ("--model.hiden_size=32", "model.hiden_size"),
    ("--model.aggregation=best", "aggregation"),
    ("--optim.lr=1", "optim"),
    ("--data.num_kv_pairs=[4, 0]", r"data.num_kv_pairs\[1\]"),
    ("--data.num_kv_pairs=[4, 2, 3]", "train.batch_size"),
])
def test_bad_config_fails_before_training(tmp_path, override, field):
    raw = tiny(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    # load_config checks the sections; train() builds the model (MCConfig checks its own values) before
    # writing anything, so a bad config leaves no out_dir behind
    with pytest.raises(ValueError, match=field.replace(".", r"\.") if "[" not in field else field):
        train(load_config(path, [override]))
    assert not Path(raw["train"]["out_dir"]).exists()


def test_cli_reports_bad_config(tmp_path, capsys):
    from mcrnn.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path)))
    assert main(["train", str(path), "--train.weight_decay=-0.1"]) == 2
    assert "train.weight_decay" in capsys.readouterr().err


def test_lr_schedule():
    f = [lr_factor(s, warmup=4, steps=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))  # cosine decays monotonically
    assert f[-1] > 0.1 and lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


# --- resume and checkpoints -------------------------------------------------------------------------------


def test_resume_is_bit_for_bit(tmp_path):
    extra = {"grad_accum": 2, "ckpt_every": 2}
    full = train(load_config(None, tiny(tmp_path, "full", train=extra)))
    cut = load_config(None, tiny(tmp_path, "cut", train=extra))
    train(cut, stop_at=3)
    assert len(train_losses(cut.train.out_dir)) == 3
    # a crash after step 3 would have left later lines behind: the resume must drop them
    with open(Path(cut.train.out_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    resumed = train(cut, resume=True)
    assert train_losses(cut.train.out_dir) == train_losses(tmp_path / "full")
    assert len(train_losses(tmp_path / "full")) == 6
    a, b = final_params(tmp_path / "full"), final_params(cut.train.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval_acc"] == full["eval_acc"] and resumed["step"] == full["step"] == 6


def test_trainer_loss_is_the_models_loss(tmp_path, monkeypatch):
    initial = {}
    build = T.build_model

    def build_and_remember(model_cfg, vocab_size):
        model = build(model_cfg, vocab_size)
        initial["state"] = copy.deepcopy(model.state_dict())
        return model

    monkeypatch.setattr(T, "build_model", build_and_remember)
    cfg = load_config(None, tiny(tmp_path, train={"steps": 1, "warmup": 1, "grad_accum": 2, "eval_every": 0}))
    res = train(cfg)

    def model_loss(model, x, y):
        # the trainer's labels are pre-shifted (y[t] is the target of x[t]); the model's `labels=` are aligned
        # with its inputs, so the same targets are [x | any token] with labels [-100 | y]
        ids = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        labels = torch.cat([torch.full_like(y[:, :1], -100), y], 1)
        with torch.no_grad():
            return float(model(input_ids=ids, labels=labels, use_cache=False).loss)

    batches = make_batches(cfg.data, cfg.train.seed)
    model = build(cfg.model, batches.vocab_size).eval()
    model.load_state_dict(initial["state"])  # the weights of step 1's forward
    x, y = batches.global_batch(0, cfg.train.batch_size)
    assert train_losses(cfg.train.out_dir)[0] == pytest.approx(model_loss(model, x, y), rel=1e-5)
    model.load_state_dict(final_params(cfg.train.out_dir))
    assert res["eval_loss"] == pytest.approx(model_loss(model, *batches.eval_set()), rel=1e-5)


def test_resume_refuses_nan_checkpoint(tmp_path):
    cfg = load_config(None, tiny(tmp_path, train={"steps": 2, "warmup": 1, "eval_every": 0}))
    train(cfg, stop_at=1)
    path = Path(cfg.train.out_dir) / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*NaN"):
        train(cfg, resume=True)


def test_resume_refuses_other_model(tmp_path):
    cfg = load_config(None, tiny(tmp_path, train={"steps": 2, "warmup": 1, "eval_every": 0}))
    train(cfg, stop_at=1)
    other = load_config(None, tiny(tmp_path, model={"hidden_size": 32},
                                   train={"steps": 2, "warmup": 1, "eval_every": 0}))
    with pytest.raises(ValueError, match="model"):
        train(other, resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    T.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:  # half a file, then the disk "fills up"
            fh.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        T.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint is intact


# --- data and smoke runs ----------------------------------------------------------------------------------


def test_mqar_batches_are_a_function_of_seed_and_step():
    from mcrnn.train.data import make_batches, shard

    cfg = load_config(None, {"data": TINY["data"]})
    a, b = make_batches(cfg.data, seed=1), make_batches(cfg.data, seed=1)
    x1, y1 = a.global_batch(5, 8)
    x2, y2 = b.global_batch(5, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a.global_batch(6, 8)[0], x1)
    assert not torch.equal(make_batches(cfg.data, seed=2).global_batch(5, 8)[0], x1)
    # two ranks with two micro-batches each tile the global batch in order
    parts = [m for r in range(2) for m in shard((x1, y1), r, 2, 2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    # the held-out set shares no generator seed with any training step (even vs odd seeds)
    ex, _ = a.eval_set()
    assert not any(torch.equal(ex[:8], a.global_batch(s, 8)[0]) for s in range(4))
    # a list of pair counts mixes them within every batch; the eval set uses the largest
    mixed = make_batches(load_config(None, {"data": {**TINY["data"], "num_kv_pairs": [2, 6]}}).data, seed=1)
    counts = (mixed.global_batch(0, 8)[1] != -100).sum(1)
    assert sorted(counts.tolist()) == [2] * 4 + [6] * 4 and counts.tolist() != sorted(counts.tolist())
    assert ((mixed.eval_set()[1] != -100).sum(1) == 6).all()


def test_text_smoke(tmp_path):
    raw = tiny(tmp_path, model={"vocab_size": 258}, data={"task": "text", "seq_len": 64, "source": "sample"},
               train={"steps": 12, "batch_size": 8, "lr": 1e-2, "warmup": 2, "eval_every": 0})
    res = train(load_config(None, raw))
    losses = train_losses(raw["train"]["out_dir"])
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5  # bytes: the unigram distribution is learnt in a few steps
    assert 0 < res["eval_loss"] < losses[0] and res["params"] > 0
    assert (Path(raw["train"]["out_dir"]) / "ckpt.pt").exists()


def test_attention_mixer_trains(tmp_path):
    raw = tiny(tmp_path, model={"mixer": "attention"}, train={"steps": 2, "warmup": 1, "eval_every": 0})
    res = train(load_config(None, raw))
    assert res["step"] == 2 and 0.0 <= res["eval_acc"] <= 1.0


# --- DDP --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo ranks x 2 micro-batches == 1 process on the whole batch (the same global rows, see
    train/data.py). Mixed numbers of pairs give rows different numbers of labels, so this also checks that
    the loss is normalised by the global label count, not averaged over micro-batches."""
    over = {"steps": 4, "warmup": 1, "eval_every": 0, "batch_size": 8}
    data = {"num_kv_pairs": [2, 4]}
    single = tiny(tmp_path, "single", train=over, data=data)
    train(load_config(None, single))
    ddp = tiny(tmp_path, "ddp", train={**over, "grad_accum": 2}, data=data)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(ddp))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "mcrnn", "train", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    # same rows, same math; only the order of the gradient sums differs
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6), (a, b)
    pa, pb = final_params(tmp_path / "single"), final_params(tmp_path / "ddp")
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5), k
    assert metrics(tmp_path / "ddp")[-1]["step"] == 4


def test_separate_documents_never_mix_documents(tmp_path):
    """`data.separate_documents`: a window's document pieces run as packed sequences, so the logits after an
    `eos` are those of the next document alone; the option trains end to end and is refused where it cannot
    apply."""
    from mcrnn.models import MCConfig, MCForCausalLM
    from mcrnn.train.trainer import forward_logits

    torch.manual_seed(0)
    model = MCForCausalLM(MCConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_heads=2,
                                   segment_size=4, aggregation="grm")).eval()
    eos = 19
    x = torch.randint(0, 19, (2, 12))
    x[0, 5] = eos  # window 0: a document ends at 5, the next starts at 6
    with torch.no_grad():
        logits, row = forward_logits(model, x, eos)
        assert row.shape == (1, 24)
        alone = model(input_ids=x[:1, 6:]).logits
        torch.testing.assert_close(logits[0, 6:12], alone[0], rtol=1e-5, atol=1e-5)
        mixed = model(input_ids=x[:1]).logits
        assert not torch.allclose(logits[0, 6:12], mixed[0, 6:], atol=1e-4)  # unpacked, they would differ
    cfg = {"model": {"hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "segment_size": 8},
           "data": {"task": "text", "tokenizer": "byte", "seq_len": 32, "num_eval": 4, "separate_documents": True},
           "train": {"steps": 2, "batch_size": 2, "warmup": 0, "log_every": 1, "out_dir": str(tmp_path / "r"),
                     "progress": False}}
    res = train(validate(cfg))
    assert math.isfinite(res["eval_loss"])
    for bad in ({"data": {**cfg["data"], "task": "mqar", "vocab_size": 32, "num_kv_pairs": 2}},
                {"model": {**cfg["model"], "mixer": ["attention"], "num_hidden_layers": 1}}):
        with pytest.raises(ValueError, match="data.separate_documents"):
            validate({**cfg, **bad})
