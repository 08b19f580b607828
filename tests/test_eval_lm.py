"""The language-modelling evaluation task: AR-hit mask, metrics on hand-made logits, post-training MC, smoke run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mcrnn.eval.lm import ar_hit_mask, ar_hit_mask_reference, bucket_edges, lm_metrics, with_post_training_mc
from mcrnn.models import MCConfig, MCForCausalLM


def _ref(x, y=None):
    """Positions j < t with the same (x, y) bigram, written as directly as possible: [N, L] bool."""
    x = torch.as_tensor(x)
    if y is None:
        y = torch.full_like(x, -100)
        y[:, :-1] = x[:, 1:]
    out = torch.zeros(x.shape, dtype=torch.bool)
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            if y[n, t] == -100:
                continue
            out[n, t] = any(x[n, j] == x[n, t] and y[n, j] == y[n, t] for j in range(t))
    return out


def test_ar_hit_mask_hand_made():
    # a b c a b c a d: bigram (a, b) first at 0, again at 3; (b, c) at 1 and 4; (c, a) at 2 and 5;
    # (a, d) at 6 is new; the last position has no target
    x = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 3]])
    want = torch.tensor([[False, False, False, True, True, True, False, False]])
    assert torch.equal(ar_hit_mask(x), want)
    # a repeated token: a a a a -> (a, a) at 0, 1, 2; hits at 1 and 2
    assert ar_hit_mask(torch.tensor([[5, 5, 5, 5]])).tolist() == [[False, True, True, False]]
    # rows are independent: the second row's bigrams never count for the first
    x2 = torch.tensor([[0, 1, 7, 7], [0, 1, 0, 1]])
    assert ar_hit_mask(x2).tolist() == [[False, False, False, False], [False, False, True, False]]
    # explicit labels (the target of the last position) and ignored labels
    x3 = torch.tensor([[4, 2, 4, 2]])
    y3 = torch.tensor([[2, 4, 2, 4]])
    assert ar_hit_mask(x3, y3).tolist() == [[False, False, True, True]]
    y3i = torch.tensor([[2, -100, 2, 4]])  # an ignored label is never a hit and never matched
    assert ar_hit_mask(x3, y3i).tolist() == [[False, False, True, False]]
    # a one-token window
    assert ar_hit_mask(torch.tensor([[3]])).tolist() == [[False]]


@pytest.mark.parametrize("seed", range(6))
def test_ar_hit_mask_random(seed):
    g = torch.Generator().manual_seed(seed)
    N, L, V = 3, 1 + 7 * seed, 2 + seed % 4  # small vocabularies: many repeated bigrams
    x = torch.randint(0, V, (N, L), generator=g)
    y = torch.randint(0, V, (N, L), generator=g)
    y[torch.rand(N, L, generator=g) < 0.2] = -100
    assert torch.equal(ar_hit_mask(x), _ref(x))
    assert torch.equal(ar_hit_mask(x, y), _ref(x, y))
    assert torch.equal(ar_hit_mask_reference(x, y), _ref(x, y))


def _logits_with_prob(labels: torch.Tensor, V: int, p: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, L, V]`` giving the label probability ``p [N, L]`` and the rest uniform."""
    logits = torch.zeros(*labels.shape, V, dtype=torch.float64)
    lab = labels.clamp_min(0)
    # label logit a with e^a / (e^a + V - 1) = p
    logits.scatter_(2, lab[..., None], torch.log(p * (V - 1) / (1 - p))[..., None])
    return logits


def test_lm_metrics_uniform_logits():
    V, N, L = 7, 3, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (N, L), generator=g)
    y = torch.randint(0, V, (N, L), generator=g)
    r = lm_metrics(torch.zeros(N, L, V), y, x, buckets=4)
    assert r["ppl"] == pytest.approx(V, rel=1e-6)
    assert r["tokens"] == N * L
    assert [b["bucket_start"] for b in r["loss_by_position"]] == [0, 4, 8, 12]
    assert all(b["value"] == pytest.approx(math.log(V), rel=1e-6) for b in r["loss_by_position"])
    assert r["ar_hit_loss"] == pytest.approx(math.log(V), rel=1e-6) or r["ar_hit_tokens"] == 0


def test_lm_metrics_buckets_and_ignored():
    # first half: label probability 1/4 (uniform over 4); second half: 1/2
    V, N, L = 4, 2, 8
    y = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 3, 2, 1, -100]])
    p = torch.full((N, L), 0.25, dtype=torch.float64)
    p[:, 4:] = 0.5
    x = torch.arange(N * L).view(N, L)  # all bigrams distinct: no hits
    r = lm_metrics(_logits_with_prob(y, V, p), y, x, buckets=2)
    assert r["tokens"] == 15
    b0, b1 = r["loss_by_position"]
    assert (b0["bucket_start"], b0["bucket_end"], b0["tokens"]) == (0, 4, 8)
    assert (b1["bucket_start"], b1["bucket_end"], b1["tokens"]) == (4, 8, 7)
    assert b0["value"] == pytest.approx(math.log(4))
    assert b1["value"] == pytest.approx(math.log(2))
    assert r["loss"] == pytest.approx((8 * math.log(4) + 7 * math.log(2)) / 15)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert r["ar_hit_fraction"] == 0 and r["ar_hit_tokens"] == 0
    assert r["other_loss"] == pytest.approx(r["loss"])
    # explicit edges
    assert bucket_edges([0, 2, 8], 8) == [0, 2, 8] and bucket_edges(3, 9) == [0, 3, 6, 9]


def test_lm_metrics_hit_split():
    # hits get probability 1/2, the other tokens 1/8: the split must recover log 2 and log 8
    V = 8
    x = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 5, 5, 5, 5]])
    y = torch.cat([x[:, 1:], torch.tensor([[1]])], dim=1)
    hits = _ref(x, y)  # (0,1) at 3 and 6, (1,2) at 4, (2,0) at 5, (5,5) at 9 and 10
    assert hits.nonzero()[:, 1].tolist() == [3, 4, 5, 6, 9, 10]
    p = torch.where(hits, 0.5, 1 / 8).double()
    r = lm_metrics(_logits_with_prob(y, V, p), y, x, buckets=1)
    assert r["ar_hit_loss"] == pytest.approx(math.log(2))
    assert r["other_loss"] == pytest.approx(math.log(8))
    assert r["ar_hit_fraction"] == pytest.approx(6 / 12)
    assert r["ar_hit_tokens"] == 6 and r["other_tokens"] == 6


def _tiny(**kw) -> MCForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=23, hidden_size=32, num_hidden_layers=2, num_heads=2, memory="linear",
               aggregation="none", init="checkpoint", segment_size=64)
    cfg.update(kw)
    return MCForCausalLM(MCConfig(**cfg)).eval()


def test_post_training_mc_same_weights():
    model = _tiny()
    mc = with_post_training_mc(model, 16)
    c = mc.config
    assert (c.aggregation, c.init, c.segment_size, c.segmentation) == ("mean", "independent", 16, "constant")
    assert model.config.aggregation == "none" and model.config.segment_size == 64  # the original is untouched
    a, b = model.state_dict(), mc.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not mc.training
    x = torch.randint(0, 23, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # up to one segment: the mean of one memory is the memory
        torch.testing.assert_close(mc(input_ids=x[:, :16]).logits, model(input_ids=x[:, :16]).logits)
        # beyond it the cached segments are read: the outputs change
        assert not torch.allclose(mc(input_ids=x).logits[:, 16:], model(input_ids=x).logits[:, 16:])


def test_post_training_mc_refuses_trained_mc():
    with pytest.raises(ValueError, match="aggregation"):
        with_post_training_mc(_tiny(aggregation="grm"), 16)
    with pytest.raises(ValueError, match="recurrent"):
        with_post_training_mc(_tiny(mixer="attention"), 16)


def test_quick_run(tmp_path):
    from mcrnn.eval import run_task

    res = run_task("lm", "configs/eval/lm.yaml", out=tmp_path, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in saved["runs"]] == [r["variant"] for r in res["runs"]]
    assert {r["variant"] for r in saved["runs"]} == {"attention", "linear", "linear_nodecay", "grm"}
    # every variant's learning rate is tuned (the quick file has one candidate)
    assert set(saved["tuned"]) == {"attention", "linear", "linear_nodecay", "grm"}
    assert all(r["lr"] == 3.0e-3 for r in saved["runs"])
    for run in saved["runs"]:
        metrics = {row["metric"] for row in run["rows"]}
        assert {"ppl", "loss_by_position", "ar_hit_loss", "other_loss", "ar_hit_fraction",
                "ppl_extrapolation"} <= metrics
        modes = {row["mode"] for row in run["rows"] if row["metric"] == "ppl_extrapolation"}
        post = {"post_training_mc", "post_training_residual", "post_training_online0.5"} \
            if run["variant"].startswith("linear") else set()
        assert modes == {"as_trained"} | post
        mults = {row["multiplier"] for row in run["rows"] if row["metric"] == "ppl_extrapolation"}
        assert mults == {1, 2}
        for row in run["rows"]:
            assert math.isfinite(row["value"]), row
        ppl = next(row for row in run["rows"] if row["metric"] == "ppl")
        assert 1 < ppl["value"] < 2 * 257  # an untrained byte model sits near the vocabulary size


def test_post_training_residual_matches_mean_up_to_the_norm_epsilon():
    model = _tiny(norm_eps=1e-12)
    mean, res = with_post_training_mc(model, 16, "mean"), with_post_training_mc(model, 16, "residual")
    assert res.config.aggregation == "residual"
    x = torch.randint(0, 23, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, base = mean(input_ids=x).logits, res(input_ids=x).logits, model(input_ids=x).logits
    # the per-head RMSNorm after the read divides out the 1/(N+1) of the mean: equal but for its epsilon,
    # while reading the caches at all changes the outputs
    assert (a - b).norm() < 1e-3 * (a - base).norm()
    with pytest.raises(ValueError, match="must be one of"):
        with_post_training_mc(model, 16, "grm")


def test_post_training_entries():
    from mcrnn.eval.lm import post_training_modes

    assert post_training_modes(["mean", "residual", {"online_weight": 0.5}]) == [
        ("post_training_mc", "mean", None), ("post_training_residual", "residual", None),
        ("post_training_online0.5", "mean", 0.5)]
    for bad in (["grm"], [{"online_weight": 0}], [{"weight": 0.5}]):
        with pytest.raises(ValueError, match="eval.post_training"):
            post_training_modes(bad)
    model = _tiny()
    half = with_post_training_mc(model, 16, "mean", 0.5)
    assert half.config.online_weight == 0.5 and half.config.aggregation == "mean"
