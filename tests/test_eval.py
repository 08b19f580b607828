"""The evaluation runner, the MQAR task, `mcrnn eval` and `mcrnn report` (the other tasks: test_eval_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mcrnn.data import mqar_spread
from mcrnn.eval import load_experiment, report, run_task, state_floats
from mcrnn.eval import mqar as mqar_task
from mcrnn.eval.cli import SWEEP, parse_dotted
from mcrnn.eval.common import deep_merge, mean_std

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "task": "mqar",
    "base": {
        "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_heads": 2, "head_dim": 4, "segment_size": 8,
                  "init": "independent"},
        "data": {"task": "mqar_spread", "seq_len": 32, "vocab_size": 32, "num_kv_pairs": 4, "num_eval": 8,
                 "random_non_queries": False},
        "train": {"steps": 2, "batch_size": 4, "warmup": 1, "log_every": 1, "eval_batch_size": 8},
    },
    "variants": {"linear": {"model": {"aggregation": "none"}}, "grm": {"model": {"aggregation": "grm"}}},
    "seeds": [0, 1],
    "eval": {"seq_lens": [32, 64], "num_kv_pairs": [4, 8, 12], "num_examples": 8},
    "quick": {"seeds": [0], "eval": {"seq_lens": [32]}},
}


def write(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_deep_merge_and_dotted_overrides():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": [1]}) == {"a": {"b": 1, "c": 3}, "d": [1]}
    assert parse_dotted(["--base.train.steps=5", "--seeds", "[0, 2]", "--eval.x="]) == {
        "base": {"train": {"steps": 5}}, "seeds": [0, 2], "eval": {"x": ""}}
    for bad in (["steps=5"], ["--a..b=1"], ["--seeds"]):
        with pytest.raises(ValueError, match="override"):
            parse_dotted(bad)


def test_load_experiment_quick_and_errors(tmp_path):
    exp = load_experiment(write(tmp_path, TINY), "mqar", quick=True)
    assert exp.seeds == [0] and exp.eval["seq_lens"] == [32] and exp.eval["num_examples"] == 8
    assert exp.runs() == [("linear", 0), ("grm", 0)]
    cfg = exp.run_config("grm", 3, tmp_path)
    assert cfg.train.seed == 3 and cfg.model["aggregation"] == "grm"
    assert Path(cfg.train.out_dir) == tmp_path / "runs" / "grm" / "seed3"
    with pytest.raises(ValueError, match="task is 'mqar', not 'niah'"):
        load_experiment(write(tmp_path, TINY), "niah")
    with pytest.raises(ValueError, match="unknown key 'varients'"):
        load_experiment(write(tmp_path, {**TINY, "varients": {}}))
    with pytest.raises(ValueError, match=r"variants.bad: model.aggregation"):
        load_experiment(write(tmp_path, deep_merge(TINY, {"variants": {"bad": {"model": {"aggregation": 3}}}})))
    with pytest.raises(ValueError, match="seeds"):
        load_experiment(write(tmp_path, {**TINY, "seeds": [-1]}))
    with pytest.raises(ValueError, match="--only: unknown variant 'ssc'"):
        load_experiment(write(tmp_path, TINY), only=["ssc"])


def test_mqar_grid_skips_impossible_cells(tmp_path):
    exp = load_experiment(write(tmp_path, TINY))
    cells = mqar_task.grid(exp.run_config("grm", 0, tmp_path), exp.eval)
    # 4 n <= L: n = 12 does not fit 32 tokens; 2 n + 2 <= 32: 12 pairs fit the vocabulary
    assert cells == [(32, 4), (32, 8), (64, 4), (64, 8), (64, 12)]


def test_mqar_cell_seeds_are_held_out_and_distinct():
    seeds = {mqar_task.cell_seed(s, L, n) for s in range(3) for L in (64, 128) for n in (4, 8)}
    assert len(seeds) == 12 and all(s % 2 == 1 for s in seeds)  # odd: never a training batch's seed


def test_mqar_accuracy_of_an_oracle_and_a_constant():
    x, y = mqar_spread(16, 32, 32, 4, random_non_queries=False, seed=1)

    class Oracle(torch.nn.Module):
        def __init__(self, answer):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.answer = answer

        def forward(self, input_ids, use_cache=False):
            logits = torch.nn.functional.one_hot(self.answer.clamp(min=0), 32).float()
            return type("Out", (), {"logits": logits[: input_ids.shape[0]]})

    assert mqar_task.accuracy(Oracle(y), x, y, batch_size=16) == 1.0
    assert mqar_task.accuracy(Oracle(torch.zeros_like(y)), x, y) == 0.0  # values are never token 0


def test_state_floats():
    base = {"hidden_size": 16, "num_heads": 2, "head_dim": 4, "num_hidden_layers": 2, "segment_size": 8}
    assert state_floats({**base, "aggregation": "none"}, 64) == 2 * 2 * 16
    # 7 caches of 4 x 4 plus the online state, and a 4-float key sum for each (scored aggregation)
    assert state_floats({**base, "aggregation": "grm"}, 64) == 2 * 2 * (16 * 8 + 4 * 8)
    assert state_floats({**base, "aggregation": "residual"}, 64) == 2 * 2 * 16 * 8
    assert state_floats({**base, "mixer": "attention"}, 64) == 2 * 2 * 64 * 2 * 4
    assert state_floats({**base, "aggregation": "grm", "segmentation": "logarithmic", "segment_size": 1}, 7) == \
        2 * 2 * (16 * 4 + 4 * 4)  # 7 = 111b: three Fenwick blocks


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 3.0])
    assert m == 2.0 and abs(s - 2 ** 0.5) < 1e-12


def test_run_task_trains_reuses_and_writes_results(tmp_path):
    path = write(tmp_path, TINY)
    res = run_task("mqar", path, out=tmp_path / "out")
    assert len(res["runs"]) == 4 and res["task"] == "mqar"
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["runs"][0]["rows"] == res["runs"][0]["rows"]
    assert {"command", "commit", "machine", "config", "wall_seconds"} <= set(on_disk)
    for run in res["runs"]:
        assert not run["reused"] and len(run["rows"]) == 5
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in run["rows"])
        assert (tmp_path / "out" / "runs" / run["variant"] / f"seed{run['seed']}" / "eval.json").exists()
    again = run_task("mqar", path, out=tmp_path / "out")
    assert all(r["reused"] for r in again["runs"])
    assert [r["rows"] for r in again["runs"]] == [r["rows"] for r in res["runs"]]  # the same models
    # a changed schedule is not the finished run: it trains again
    longer = run_task("mqar", path, out=tmp_path / "out", overrides={"base": {"train": {"steps": 3}}},
                      only=["grm"])
    assert not any(r["reused"] for r in longer["runs"]) and {r["variant"] for r in longer["runs"]} == {"grm"}


def test_cli_eval_errors(capsys):
    from mcrnn.cli import main

    assert main(["eval", "nope", "x.yaml"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "mqar"]) == 2
    assert "CONFIG.yaml is required" in capsys.readouterr().err
    assert main(["eval", "mqar", str(ROOT / "configs/eval/niah.yaml")]) == 2
    assert "not 'mqar'" in capsys.readouterr().err


@pytest.mark.parametrize("task,rel", SWEEP)
def test_sweep_files_are_valid(task, rel):
    for quick in (False, True):
        exp = load_experiment(ROOT / rel, task, quick=quick)
        assert exp.variants and exp.seeds


# --- the report, from a hand-made fixture ------------------------------------------------------------------


def _mqar_result(accs: dict[str, list[float]], cells=((64, 8), (128, 8)), desc="fixture") -> dict:
    runs = []
    for v, per_seed in accs.items():
        for seed, a in enumerate(per_seed):
            runs.append({"variant": v, "seed": seed, "params": 1000, "state_floats": 64, "train_seq_len": 64,
                         "model": {"hidden_size": 16, "num_heads": 2, "head_dim": 4, "num_hidden_layers": 1,
                                   "segment_size": 4, "aggregation": "none" if v == "linear" else "grm",
                                   **({"mixer": "attention"} if v == "attention" else {})},
                         "rows": [{"seq_len": L, "num_kv_pairs": n, "accuracy": a - 0.1 * (L > 64)}
                                  for L, n in cells]})
    return {"task": "mqar", "description": desc, "command": "mcrnn eval mqar x.yaml", "experiment": "x.yaml",
            "commit": "abc1234", "machine": {"cpu": "test cpu", "cores": 2, "torch": "2.x"}, "jobs": 1,
            "threads": 1, "wall_seconds": 60.0, "finished": "today", "runs": runs}


FIXTURE = {
    "mqar": _mqar_result({"attention": [1.0, 1.0], "linear": [0.3, 0.4], "linear_equal_state": [0.5, 0.5],
                          "residual": [0.5, 0.6], "grm": [0.9, 0.8], "ssc": [0.6, 0.7]}),
    "ablations": _mqar_result({"grm_seg4": [0.9], "grm_logarithmic": [0.7], "grm_input_scores": [0.95]}),
    "niah": {"task": "niah", "runs": [
        {"variant": v, "seed": 0, "params": 1, "train_seq_len": 256, "rows": [
            {"niah": t, "seq_len": 256 * m, "length_multiplier": m, "depth": d, "accuracy": a, "n": 1}
            for t in (1, 3) for m in (1, 2) for d in (0.0, 1.0)]}
        for v, a in (("attention", 1.0), ("linear", 0.0), ("grm", 0.5))]},
    "lm": {"task": "lm", "runs": [
        {"variant": v, "seed": 0, "params": 5, "train_seq_len": 256, "rows": [
            {"metric": "ppl", "seq_len": 256, "value": p},
            {"metric": "ar_hit_loss", "seq_len": 256, "value": 1.0},
            {"metric": "other_loss", "seq_len": 256, "value": 2.0},
            {"metric": "ar_hit_fraction", "seq_len": 256, "value": 0.3},
            {"metric": "loss_by_position", "seq_len": 256, "bucket_start": 0, "bucket_end": 128, "value": 2.5},
            {"metric": "loss_by_position", "seq_len": 256, "bucket_start": 128, "bucket_end": 256, "value": 2.0},
            *[{"metric": "ppl_extrapolation", "seq_len": 256 * m, "multiplier": m, "mode": "as_trained",
               "value": p * m} for m in (1, 2)],
            *([{"metric": "ppl_extrapolation", "seq_len": 256 * m, "multiplier": m, "mode": "post_training_mc",
                "value": p} for m in (1, 2)] if v == "linear" else [])]}
        for v, p in (("linear", 6.0), ("grm", 5.0))]},
    "throughput": {"task": "throughput", "rows": [
        {"variant": v, "seq_len": L, "train_tokens_per_s": t / L ** (2 * (v == "attention")),
         "decode_tokens_per_s": 10.0,
         "peak_mb": 5.0} for v, t in (("attention", 4000.0), ("linear", 1000.0), ("linear_ssc", 800.0),
                                                                  ("linear_grm", 600.0))
        for L in (2, 4)]},
}


def test_claims_from_fixture():
    rows = {c[0]: (c[1], c[2]) for c in report.claims(FIXTURE)}
    assert rows["MC beats its base RNN everywhere"][1] == "yes"
    order = rows["GRM > Soup > SSC > Residual > base (accuracy)"]
    assert order[1] == "yes" and "grm 0.800 > ssc 0.600 > residual 0.500 > linear 0.300" in order[0]
    gap = rows["The Transformer is still best on hard recall; MC closes most of the gap"]
    assert "grm 0.850 vs attention 1.000" in gap[0] and gap[1] == "yes"
    assert rows["Constant segments beat logarithmic ones (Log-Linear++)"][1] == "yes"
    assert rows["Context-dependent gates matter (input-only gates drop retrieval)"][1] == "no"
    tp = rows["SSC stays close to the base RNN's training throughput; MC sits between the RNN and the Transformer"]
    assert tp[1] == "yes" and "0.80 at 2" in tp[0]  # attention 250 tok/s at 4: the MC variants lie between
    assert rows["Post-training MC (uniform average of cached memories) improves length extrapolation"][1] == "yes"
    assert rows["(ours) MC beats the base RNN given the same state size (equal-state control)"][1] == "yes"
    assert report.claims({})[0][2] == report.NOT_MEASURED


def test_report_builds_from_fixture(tmp_path):
    root = tmp_path / "results"
    for name, res in FIXTURE.items():
        (root / name / "full").mkdir(parents=True)
        (root / name / "full" / "results.json").write_text(json.dumps(res))
    assert set(report.load_results([root])) == set(FIXTURE)
    assert report.main([str(root), "--out", str(tmp_path / "docs" / "results.md")]) == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| `grm` | 1,000 | 64 | 0.850 ± 0.071 | 0.750 ± 0.071 |" in text
    assert "mcrnn eval mqar x.yaml" in text and "commit `abc1234`" in text
    assert "not measured (`mcrnn eval mqar configs/eval/mqar_deep.yaml`)" in text
    for png in ("mqar.png", "state.png", "niah.png", "extrapolation.png", "throughput.png", "ablations.png"):
        assert (tmp_path / "docs" / "results" / png).stat().st_size > 1000
    assert report.main([str(tmp_path / "empty")]) == 2
