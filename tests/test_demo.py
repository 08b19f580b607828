"""The recall demo: a --quick smoke run of the whole pipeline, and (slow) the full run and its claim."""

from __future__ import annotations

import json

import pytest

from mcrnn.experiments import demo

KEYS = {"model", "aggregation", "accuracy", "params", "train_seconds"}


def test_demo_quick(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["model"], r["aggregation"]) for r in rows] == [(m, a) for m, a, _, _ in demo.RUNS]
    for r in rows:
        assert set(r) == KEYS
        assert 0.0 <= r["accuracy"] <= 1.0 and r["params"] > 0 and r["train_seconds"] > 0
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "accuracy" in capsys.readouterr().out  # the table was printed


def test_demo_runs_share_the_setting():
    """Same width, depth, data and budget for every model; only the mixer / aggregation differ."""
    cfgs = [c for *_, c in demo.configs(False, demo.Path("unused"))]
    for c in cfgs[1:]:
        assert c.data == cfgs[0].data
        assert {k: v for k, v in vars(c.train).items() if k != "out_dir"} == \
            {k: v for k, v in vars(cfgs[0].train).items() if k != "out_dir"}
        for key in ("hidden_size", "num_hidden_layers", "num_heads"):
            assert c.model[key] == cfgs[0].model[key]


@pytest.mark.slow
def test_demo_claim(tmp_path):
    """The full demo (minutes): MC beats the base RNN by >= 20 points, attention is the ceiling."""
    code = demo.main(["--out", str(tmp_path), "--no-progress"])
    rows = {r["aggregation"] if r["model"] == "linear+MC" else r["model"]: r["accuracy"]
            for r in json.loads((tmp_path / "summary.json").read_text())}
    assert rows["grm"] - rows["linear"] >= demo.MIN_GAP, rows
    assert rows["attention"] >= rows["grm"], rows
    assert code == 0
