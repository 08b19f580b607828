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
from mcrnn.eval.cli import GPU_SWEEP, SWEEP, parse_dotted
from mcrnn.eval.common import deep_merge, mean_se, mean_std, state_counts
from mcrnn.ops import MEMORIES

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


class _Diverging(torch.nn.Module):
    """The oracle of ``answers``, except on examples ``bad``: their logits are NaN (``raise_=False``), or the
    whole forward raises as the ops do on a non-finite gate when such an example is in the batch."""

    def __init__(self, answers, bad, raise_=False, message="gate `a` contains NaN or inf"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.bad, self.raise_, self.message, self.calls = answers, set(bad), raise_, message, 0

    def forward(self, input_ids, use_cache=False):
        self.calls += 1
        # which example each row is: looked up by its tokens (the batches are slices of the inputs)
        idx = [self.index[tuple(r.tolist())] for r in input_ids]
        if self.raise_ and self.bad & set(idx):
            raise ValueError(self.message)
        logits = torch.nn.functional.one_hot(self.answers[idx].clamp(min=0), 32).float()
        for j, i in enumerate(idx):
            if i in self.bad:
                logits[j, -1, 0] = float("nan")  # one non-finite logit, away from the queried positions
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize("raise_", [False, True])
def test_mqar_divergence_is_scored_per_example(raise_):
    x, y = mqar_spread(16, 32, 32, 4, random_non_queries=True, seed=3)
    model = _Diverging(y, bad={2, 11}, raise_=raise_)
    model.index = {tuple(r.tolist()): i for i, r in enumerate(x)}
    assert len(model.index) == 16
    s = mqar_task.score(model, x, y, batch_size=8)
    assert s["n_diverged"] == 2 and abs(s["accuracy"] - 14 / 16) < 1e-12  # 4 queries each; the others all right
    assert s["reason"] == ("gate `a` contains NaN or inf" if raise_ else "non-finite logits")
    if raise_:  # bisection: each bad batch of 8 is split down to its bad example (1 + 2 + 2 + 2 calls), not 8
        assert model.calls == 2 + 2 * (2 + 2 + 2)
    model = _Diverging(y, bad=set(), raise_=raise_)
    model.index = {tuple(r.tolist()): i for i, r in enumerate(x)}
    assert mqar_task.score(model, x, y) == {"accuracy": 1.0, "n_diverged": 0, "reason": None}


def test_mqar_other_errors_are_not_divergence():
    x, y = mqar_spread(4, 32, 32, 4, seed=3)
    model = _Diverging(y, bad={0}, raise_=True, message="input_ids must be [B, T]")
    model.index = {tuple(r.tolist()): i for i, r in enumerate(x)}
    with pytest.raises(ValueError, match="input_ids"):
        mqar_task.score(model, x, y)


def test_mqar_chance_levels():
    assert mqar_task.chance_levels(32, 8) == {"chance": 1 / 16, "guess_among_values": 1 / 8}
    assert mqar_task.chance_levels(33, 4)["chance"] == 1 / 17  # values are [V // 2, V)


def test_state_floats():
    base = {"hidden_size": 16, "num_heads": 2, "head_dim": 4, "num_hidden_layers": 2, "segment_size": 8}
    assert state_floats({**base, "aggregation": "none"}, 64) == 2 * 2 * 16
    # 7 caches of 4 x 4 plus the online state, and a 4-float key sum for each (scored aggregation)
    assert state_floats({**base, "aggregation": "grm"}, 64) == 2 * 2 * (16 * 8 + 4 * 8)
    assert state_floats({**base, "aggregation": "residual"}, 64) == 2 * 2 * 16 * 8
    assert state_floats({**base, "mixer": "attention"}, 64) == 2 * 2 * 64 * 2 * 4
    assert state_floats({**base, "aggregation": "grm", "segmentation": "logarithmic", "segment_size": 1}, 7) == \
        2 * 2 * (16 * 4 + 4 * 4)  # 7 = 111b: three Fenwick blocks
    assert state_counts({**base, "aggregation": "grm"}, 64) == {"memory": 2 * 2 * 16 * 8, "summaries": 2 * 2 * 4 * 8,
                                                                "kv": 0}
    assert state_counts({**base, "aggregation": "residual"}, 64)["summaries"] == 0  # unscored: no key sums
    assert state_counts({**base, "mixer": ["attention", "mc"], "aggregation": "none"}, 64) == {
        "memory": 2 * 16, "summaries": 0, "kv": 2 * 64 * 2 * 4}
    deep = {**base, "memory": "titans", "memory_depth": 2, "expansion": 2, "mini_batch": 4, "aggregation": "soup"}
    # per head: a 2-layer MLP 4 -> 8 -> 4 (64 floats); online: the weights, their mini-batch start and the
    # momentum; each of the 7 caches keeps the weights only (what a read needs)
    assert state_counts(deep, 64) == {"memory": 2 * 2 * (3 * 64 + 7 * 64), "summaries": 2 * 2 * 4 * 8, "kv": 0}


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_state_counts_are_the_floats_of_the_decode_state(memory):
    """The counts are what an MCState really holds after `seq_len` tokens (one layer, one sequence)."""
    from mcrnn.layers import MCCache, MemoryCachingAttention

    cfg = {"hidden_size": 16, "num_heads": 2, "head_dim": 4, "num_hidden_layers": 1, "segment_size": 8,
           "memory": memory, "aggregation": "grm", "expansion": 2, "mini_batch": 4}
    layer = MemoryCachingAttention(16, 2, head_dim=4, memory=memory, aggregation="grm", segment_size=8, expansion=2,
                                   mini_batch=4, layer_idx=0)
    cache = MCCache(num_layers=1)
    layer(torch.randn(1, 61, 16), past_key_values=cache, use_cache=True)
    st = cache[0].mc
    memory_floats = sum(x.numel() for x in st.online.values()) + sum(x.numel() for x in st.cache.values())
    summary_floats = st.key_sum.numel() + st.cache_key_sum.numel()
    assert state_counts(cfg, 61) == {"memory": memory_floats, "summaries": summary_floats, "kv": 0}


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 3.0])
    assert m == 2.0 and abs(s - 2 ** 0.5) < 1e-12
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(se - 1 / 3 ** 0.5) < 1e-12 and mean_se([4.0]) == (4.0, 0.0)


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
        assert all(r["n_diverged"] == 0 and r["divergence_rate"] == 0.0 for r in run["rows"])
        assert [r["guess_among_values"] for r in run["rows"]] == [1 / 4, 1 / 8, 1 / 4, 1 / 8, 1 / 12]
        assert all(r["chance"] == 1 / 16 for r in run["rows"])
        assert run["state"] == state_counts(run["model"], 32) and run["state_floats"] == sum(run["state"].values())
        assert (tmp_path / "out" / "runs" / run["variant"] / f"seed{run['seed']}" / "eval.json").exists()
    again = run_task("mqar", path, out=tmp_path / "out")
    assert all(r["reused"] for r in again["runs"])
    assert [r["rows"] for r in again["runs"]] == [r["rows"] for r in res["runs"]]  # the same models
    # the evaluation of an unchanged run is reused too; other eval settings (or no eval.json) measure again
    assert all(r["wall_eval_s"] == r0["wall_eval_s"] for r, r0 in zip(again["runs"], res["runs"], strict=True))
    for f in (tmp_path / "out" / "runs" / "grm").glob("seed*/eval.json"):
        f.unlink()
    fewer = run_task("mqar", path, out=tmp_path / "out", overrides={"eval": {"num_examples": 4}}, only=["linear"])
    remeasured = run_task("mqar", path, out=tmp_path / "out", only=["grm", "linear"])
    assert {r["eval"]["num_examples"] for r in fewer["runs"]} == {4}
    assert {r["eval"]["num_examples"] for r in remeasured["runs"]} == {8}
    for r in fewer["runs"] + remeasured["runs"]:
        assert r["reused"]
        assert r["wall_eval_s"] != next(x["wall_eval_s"] for x in res["runs"] if x["variant"] == r["variant"])
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


@pytest.mark.parametrize("task,rel", SWEEP + GPU_SWEEP)
def test_sweep_files_are_valid(task, rel):
    for quick in (False, True):
        exp = load_experiment(ROOT / rel, task, quick=quick)
        assert exp.variants and exp.seeds


# --- the report, from a hand-made fixture ------------------------------------------------------------------


def _mqar_result(accs: dict[str, list[float]], cells=((64, 8), (128, 8)), desc="fixture") -> dict:
    """A results dict of task mqar: ``accs[variant][seed]`` at L = 64, 0.1 less at longer lengths."""
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
            "threads": 1, "wall_seconds": 60.0, "finished": "today", "runs": runs,
            "config": {"base": {"data": {"vocab_size": 32}}}}


SEEDS = (0, 1, 2)
# three seeds, every claimed difference far beyond 2 standard errors: the verdicts are those of the raw means
FIXTURE = {
    "mqar": _mqar_result({"attention": [1.0, 1.0, 1.0], "linear": [0.3, 0.4, 0.35],
                          "linear_k8": [0.5, 0.5, 0.52], "residual": [0.5, 0.6, 0.55],
                          "grm": [0.9, 0.8, 0.85], "ssc": [0.6, 0.7, 0.65], "grm_log": [0.5, 0.52, 0.48]}),
    "ablations": _mqar_result({"grm_seg4": [0.9, 0.88, 0.92], "grm_logarithmic": [0.7, 0.72, 0.68],
                               "grm_input_scores": [0.95, 0.97, 0.96]}),
    "niah": {"task": "niah", "runs": [
        {"variant": v, "seed": s, "params": 1, "train_seq_len": 256, "rows": [
            {"niah": t, "seq_len": 256 * m, "length_multiplier": m, "depth": d, "accuracy": a + 0.01 * s,
             "byte_accuracy": 0.5, "teacher_forced_accuracy": a + 0.02 * s, "n": 1}
            for t in (1, 3) for m in (1, 2) for d in (0.0, 1.0)]}
        for v, a in (("attention", 0.97), ("linear", 0.0), ("grm", 0.5)) for s in SEEDS]},
    "lm": {"task": "lm", "runs": [
        {"variant": v, "seed": s, "params": 5, "train_seq_len": 256, "rows": [
            {"metric": "ppl", "seq_len": 256, "value": p + 0.01 * s},
            {"metric": "ar_hit_loss", "seq_len": 256, "value": p / 5 + 0.01 * s},
            {"metric": "other_loss", "seq_len": 256, "value": 2.0},
            {"metric": "ar_hit_fraction", "seq_len": 256, "value": 0.3},
            {"metric": "loss_by_position", "seq_len": 256, "bucket_start": 0, "bucket_end": 128, "value": 2.5},
            {"metric": "loss_by_position", "seq_len": 256, "bucket_start": 128, "bucket_end": 256, "value": 2.0},
            *[{"metric": "ppl_extrapolation", "seq_len": 256 * m, "multiplier": m, "mode": "as_trained",
               "value": p * m + 0.01 * s} for m in (1, 2)],
            *([{"metric": "ppl_extrapolation", "seq_len": 256 * m, "multiplier": m, "mode": "post_training_mc",
                "value": p + 0.01 * s} for m in (1, 2)] if v.startswith("linear") else [])]}
        for v, p in (("linear", 6.0), ("linear_nodecay", 6.5), ("grm", 5.0)) for s in SEEDS]},
    "throughput": {"task": "throughput", "rows": [
        {"variant": v, "seq_len": L, "train_tokens_per_s": t / L ** (2 * (v == "attention")),
         "decode_tokens_per_s": 10.0,
         "peak_mb": 5.0} for v, t in (("attention", 4000.0), ("linear", 1000.0), ("linear_ssc", 800.0),
                                                                  ("linear_grm", 600.0))
        for L in (2, 4)]},
}
GAP = "The Transformer is still best on hard recall; MC closes most of the gap"
TP = "SSC stays close to the base RNN's training throughput; MC sits between the RNN and the Transformer"


def test_claims_from_fixture():
    rows = {c[0]: (c[1], c[2]) for c in report.claims(FIXTURE)}
    assert len(rows) == 8 and len(report.load_claims()) == 8
    mc = rows["MC beats its base RNN everywhere"]
    assert mc[1] == "yes" and "L=128, n=8: residual 0.450 ± 0.029 > linear 0.250 ± 0.029" in mc[0]
    # the fixture's niah has no ssc and its mqar no gdn: those drop out of the checks, which say so
    assert "S-NIAH mean: grm 0.510 ± 0.006 > linear 0.010 ± 0.006 (no ssc in niah) (yes)" in mc[0]
    assert "MQAR (Gated DeltaNet): nothing to compare (no gdn_grm, gdn in mqar) (not measured)" in mc[0]
    assert "perplexity: grm 5.01 ± 0.01 < linear 6.01 ± 0.01 (yes)" in mc[0]
    order = rows["GRM > Soup > SSC > Residual > base (accuracy)"]
    assert order[1] == "yes"
    assert "grm 0.800 ± 0.029 > ssc 0.600 ± 0.029 > residual 0.500 ± 0.029 > linear 0.300 ± 0.029" in order[0]
    # the DLA half of the claim is not measured: no mqar_deep results
    assert "DLA" not in order[0]
    gap = rows[GAP]
    assert "linear 0.350 ± 0.029 → grm 0.850 ± 0.029 vs attention 1.000 ± 0.000 (77% of the gap closed, > 50%)" \
        in gap[0] and gap[1] == "yes"
    assert rows["Constant segments beat logarithmic ones (Log-Linear++)"][1] == "yes"
    assert rows["Context-dependent gates matter (input-only gates drop retrieval)"][1] == "no"
    tp = rows[TP]
    assert tp[1] == "yes" and "L=2: 0.80 (> 0.5)" in tp[0]  # attention 250 tok/s at 4: the MC variants lie between
    post = rows["Post-training MC (uniform average of cached memories) improves length extrapolation"]
    assert post[1] == "yes" and "2x: linear/post_training_mc 6.01 ± 0.01 < linear/as_trained 12.01 ± 0.01" in post[0]
    assert "2x: linear_nodecay/post_training_mc 6.51 ± 0.01 < linear_nodecay/as_trained 13.01 ± 0.01" in post[0]
    assert "1x" not in post[0]  # where: multiplier > 1
    assert rows["(ours) MC beats the base RNN given the same state size (equal-state control)"][1] == "yes"
    assert report.claims({})[0][2] == report.NOT_MEASURED


def test_claims_match_the_raw_means_verdicts_they_replace():
    """With well-separated seeds the declared checks give the verdicts the hard-coded ones gave (raw means)."""
    expected = {"MC beats its base RNN everywhere": "yes", "GRM > Soup > SSC > Residual > base (accuracy)": "yes",
                GAP: "yes", "Constant segments beat logarithmic ones (Log-Linear++)": "yes",
                "Context-dependent gates matter (input-only gates drop retrieval)": "no", TP: "yes",
                "Post-training MC (uniform average of cached memories) improves length extrapolation": "yes",
                "(ours) MC beats the base RNN given the same state size (equal-state control)": "yes"}
    assert {c: v for c, _, v in report.claims(FIXTURE)} == expected


def _pair(a: list[float], b: list[float]) -> dict:
    return {"mqar": _mqar_result({"grm": a, "linear": b}, cells=((64, 8),))}


ONE_CHECK = [{"claim": "grm beats linear", "checks": [
    {"experiment": "mqar", "metric": "accuracy", "order": ["grm", "linear"]}]}]


@pytest.mark.parametrize("a,b,verdict", [
    ([0.9, 0.91, 0.89], [0.5, 0.52, 0.48], "yes"),            # 3 seeds, well separated
    ([0.5, 0.52, 0.48], [0.9, 0.91, 0.89], "no"),             # the opposite, beyond 2 SE
    ([0.6, 0.9, 0.3], [0.5, 0.8, 0.4], "not measurable"),     # overlapping: within 2 SE
    ([0.9], [0.5], "not measurable"),                          # one seed: no standard error
    ([0.9, 0.91], [0.5, 0.52], "not measurable"),              # two seeds: still fewer than 3
    ([0.7, 0.7, 0.7], [0.7, 0.7, 0.7], "not measurable"),      # equal, zero spread
])
def test_verdict_rules(a, b, verdict):
    (_, text, v), = report.claims(_pair(a, b), ONE_CHECK)
    assert v == verdict, text


def test_verdict_threshold_is_two_standard_errors_of_the_difference():
    # se_a = se_b = 0.1 / sqrt(3): se_d = 0.1 * sqrt(2/3) = 0.0816; 2 se_d = 0.163
    lo = [0.4, 0.5, 0.6]
    assert report.contrast({"a": [x + 0.17 for x in lo], "b": lo}, {"a": 1, "b": -1})[0] == "yes"
    assert report.contrast({"a": [x + 0.15 for x in lo], "b": lo}, {"a": 1, "b": -1})[0] == "not measurable"
    v, d, se = report.contrast({"a": [x + 0.15 for x in lo], "b": lo}, {"a": 1, "b": -1})
    assert abs(d - 0.15) < 1e-12 and abs(se - 0.1 * (2 / 3) ** 0.5) < 1e-12
    assert report.contrast({"a": [1.0], "b": [2.0]}, {"a": 1, "b": -1}, rule="direct")[0] == "no"


def test_claim_verdicts_combine_and_texts():
    assert report.combine(["yes", "yes"]) == "yes" and report.combine(["no", report.NOT_MEASURED]) == "no"
    assert report.combine(["yes", "not measurable"]) == "partly"
    assert report.combine([report.NOT_MEASURED]) == report.NOT_MEASURED
    one_seed = {"mqar": _mqar_result({"grm": [0.9], "linear": [0.5]})}
    (_, text, v), = report.claims(one_seed, ONE_CHECK)
    assert v == "not measurable" and "grm 0.850 vs linear 0.450" in text
    typo = [{"claim": "c", "checks": [{"experiment": "mqar", "metric": "accuracy", "order": ["gmr", "linear"]}]}]
    (_, text, v), = report.claims(one_seed, typo)
    assert v == report.NOT_MEASURED and "no gmr in mqar" in text
    # many comparisons (over 6): counts per pair instead of a list
    grid = ((64, 4), (64, 8), (128, 4), (128, 8), (128, 12), (256, 8), (256, 12))
    many = {"mqar": _mqar_result({"grm": [0.9, 0.91, 0.89], "linear": [0.5, 0.52, 0.48]}, cells=grid)}
    per_cell = [{"claim": "c", "checks": [{"experiment": "mqar", "metric": "accuracy", "per": "cell",
                                           "better": ["grm"], "than": "linear"}]}]
    (_, text, v), = report.claims(many, per_cell)
    assert v == "yes" and "grm vs linear: better mean in 7/7 cells, beyond 2 SE in 7, worse beyond 2 SE in 0" in text
    many["mqar"]["runs"] = [r for r in many["mqar"]["runs"] if r["seed"] == 0]
    (_, text, v), = report.claims(many, per_cell)
    assert v == "not measurable" and "better mean in 7/7 cells (fewer than 3 seeds)" in text


def test_claims_file_is_checked(tmp_path):
    good = {"experiment": "mqar", "metric": "accuracy", "order": ["a", "b"]}
    for bad, msg in (({**good, "ordre": 1}, "unknown key 'ordre'"),
                     ({**good, "better": ["a"]}, "exactly one of"),
                     ({k: v for k, v in good.items() if k != "metric"}, "`metric` is required"),
                     ({**good, "order": ["a"]}, "two or more"),
                     ({"experiment": "m", "metric": "x", "ratio": {"of": "a"}}, "needs of, to, at_least"),
                     ({**good, "rule": "raw"}, "rule must be")):
        path = write(tmp_path, {"claims": [{"claim": "c", "checks": [bad]}]}, "claims.yaml")
        with pytest.raises(ValueError, match=msg):
            report.load_claims(path)
    with pytest.raises(ValueError, match="claims:"):
        report.load_claims(write(tmp_path, {"claim": []}, "claims.yaml"))


def test_claims_name_only_declared_variants():
    # every variant a check names exists in the experiment file it names (a typo would read "not measured")
    for c in report.load_claims():
        for chk in c["checks"]:
            exp = load_experiment(ROOT / "configs" / "eval" / f"{chk['experiment']}.yaml")
            kind = next(k for k in report._KINDS if k in chk)
            for name in report._named(chk, kind)[0]:
                assert name.split("/")[0] in exp.variants, (c["claim"], name)


def test_mqar_table_shows_state_split_chance_and_divergence():
    res = _mqar_result({"attention": [1.0], "linear": [0.5], "grm": [0.9]})
    res["runs"][2]["rows"][1].update(n_diverged=4, divergence_rate=0.25, diverged="non-finite logits")
    table = report.mqar_table(res)
    assert "| `grm` | 1,000 | 512 | 128 | 0.900 | 0.800 |" in table  # 16 states of 2 x 4 x 4; 16 key sums of 2 x 4
    assert "| `attention` | 1,000 | 1,024 (KV cache) | – |" in table
    assert "| *chance (1/16 value tokens)* |  |  |  | 0.062 | 0.062 |" in table
    assert "| *guess among the n values (1/n)* |  |  |  | 0.125 | 0.125 |" in table
    div = report.divergence_table(res)
    assert "| `grm` | 0.000 | 0.250 |" in div and "`linear`" not in div
    old = _mqar_result({"dla": [0.0]})  # a result from before per-example scoring: the whole cell diverged
    old["runs"][0]["rows"][0]["diverged"] = "gate `a` contains NaN or inf"
    assert "| `dla` | 1.000 | 0.000 |" in report.divergence_table(old)
    assert report.divergence_table(_mqar_result({"grm": [0.9]})) is None


def test_report_builds_from_fixture(tmp_path):
    root = tmp_path / "results"
    for name, res in FIXTURE.items():
        (root / name / "full").mkdir(parents=True)
        (root / name / "full" / "results.json").write_text(json.dumps(res))
    assert set(report.load_results([root])) == set(FIXTURE)
    assert report.main([str(root), "--out", str(tmp_path / "docs" / "results.md")]) == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| `grm` | 1,000 | 512 | 128 | 0.850 ± 0.050 | 0.750 ± 0.050 |" in text
    assert "mcrnn eval mqar x.yaml" in text and "commit `abc1234`" in text
    assert "not measured (`mcrnn eval mqar configs/eval/mqar_deep.yaml`)" in text
    assert "configs/eval/claims.yaml" in text and "No example diverged." in text
    assert "| *chance (a guess in the answer's format)* | 0.000 |" in text  # exact match of a 7-digit number
    assert "| *chance (a guess in the answer's format)* | 0.102 |" in text  # a digit: 1/9 first, then 1/10
    for png in ("mqar.png", "state.png", "niah.png", "extrapolation.png", "throughput.png", "ablations.png"):
        assert (tmp_path / "docs" / "results" / png).stat().st_size > 1000
    assert report.main([str(tmp_path / "empty")]) == 2
    assert report.main([str(root), "--out", str(tmp_path / "x.md"), "--claims", str(tmp_path / "none.yaml")]) == 2


def test_mqar_grid_with_pairs_growing_with_the_length(tmp_path):
    exp = load_experiment(write(tmp_path, deep_merge(TINY, {"base": {"data": {"vocab_size": 40}},
                                                            "eval": {"num_kv_pairs": None, "seq_lens": [32, 64, 128],
                                                                     "pairs_per_token": 0.125}})))
    cfg = exp.run_config("grm", 0, tmp_path)
    assert mqar_task.grid(cfg, exp.eval) == [(32, 4), (64, 8), (128, 16)]
    with pytest.raises(ValueError, match="not both"):
        mqar_task.grid(cfg, {**exp.eval, "num_kv_pairs": [4]})
    with pytest.raises(ValueError, match=r"pairs_per_token: 32 pairs at L=256 need data.vocab_size >= 66"):
        mqar_task.grid(cfg, {**exp.eval, "seq_lens": [256]})
    with pytest.raises(ValueError, match=r"eval.pairs_per_token: must be in \(0, 0.25\]"):
        mqar_task.grid(cfg, {**exp.eval, "pairs_per_token": 0.5})


def test_capacity_table_and_frontier(tmp_path):
    res = _mqar_result({"attention": [1.0, 0.9], "linear": [0.5, 0.4], "grm": [0.9, 0.8]},
                       cells=((64, 8), (128, 16)))
    table = report.capacity_table(res)
    assert "| variant | L=64 (n≤8) | L=128 (n≤16) |" in table
    # linear: a fixed 2 heads x 4 x 4 state; grm: 15 then 31 cached states and their key sums; attention: KV
    assert "| `linear` | 32 | 32 |" in table
    assert f"| `grm` | {32 + 15 * 32 + 16 * 8:,} | {32 + 31 * 32 + 32 * 8:,} |" in table
    assert "| `attention` | 1,024 | 2,048 |" in table
    assert report.frontier_plot(res, tmp_path / "f.png").stat().st_size > 1000


def test_learning_rates_are_tuned_per_variant(tmp_path):
    raw = deep_merge(TINY, {"seeds": [0], "eval": {"seq_lens": [32], "num_kv_pairs": [4]},
                            "tune": {"lr": [1.0e-3, 3.0e-2], "seed": 7, "metric": "eval_loss"}})
    res = run_task("mqar", write(tmp_path, raw), out=tmp_path / "out")
    assert set(res["tuned"]) == {"linear", "grm"}
    for v, rec in res["tuned"].items():
        cands = {float(k): x for k, x in rec["candidates"].items()}
        assert set(cands) == {1.0e-3, 3.0e-2} and rec["lr"] == min(cands, key=cands.get)
        assert (tmp_path / "out" / "tune" / v / "lr0.001" / "ckpt.pt").exists()
    assert {r["variant"]: r["lr"] for r in res["runs"]} == {v: rec["lr"] for v, rec in res["tuned"].items()}
    assert "Learning rates tuned per variant over {0.001, 0.03}" in report.provenance(res)
    again = run_task("mqar", write(tmp_path, raw), out=tmp_path / "out")  # every run reused
    assert again["tuned"] == res["tuned"] and all(r["reused"] for r in again["runs"])
    for bad, match in (({"lr": []}, "tune.lr"), ({"lr": [1e-3], "seed": 0}, "tune.seed"),
                       ({"lr": [1e-3], "metric": "acc"}, "tune.metric"), ({"lrs": [1]}, "keys lr, seed, metric")):
        with pytest.raises(ValueError, match=match):
            load_experiment(write(tmp_path, {**raw, "tune": bad}))
    from mcrnn.eval.common import final_metric

    assert final_metric(tmp_path / "nowhere", "eval_loss") != final_metric(tmp_path / "nowhere", "eval_loss")  # NaN


def test_collect_then_rebuild_is_exact(tmp_path, monkeypatch):
    src = tmp_path / "results" / "eval"
    for name, res in FIXTURE.items():
        (src / name / "full").mkdir(parents=True)
        (src / name / "full" / "results.json").write_text(json.dumps(res))
    (src / "half_done" / "full").mkdir(parents=True)  # an experiment still running: no results.json yet
    monkeypatch.chdir(tmp_path)
    assert report.main(["--collect", "results/eval"]) == 0
    assert sorted(p.parent.parent.name for p in (tmp_path / "docs/results").glob("*/full/results.json")) \
        == sorted(FIXTURE)
    first = (tmp_path / "docs/results.md").read_text()
    assert report.main([]) == 0  # a fresh clone: only the committed JSON
    assert (tmp_path / "docs/results.md").read_text() == first
    assert "Floats each model holds at the end" in first and "| `linear_k8` |" in first
    assert (tmp_path / "docs/results/frontier.png").stat().st_size > 1000
    assert report.main(["--collect", "nowhere"]) == 2


def test_gpu_suite_quick_runs_on_cpu(tmp_path):
    from mcrnn.cli import main

    assert main(["eval", "all", "--suite", "gpu", "--quick", "--root", str(tmp_path)]) == 0
    found = report.load_results([tmp_path], quick=True)
    assert set(found) == {"mqar", "niah", "lm"} and all(r["tuned"] for r in found.values())
    assert found["mqar"]["config"]["base"]["data"]["vocab_size"] == 512  # the quick section's
