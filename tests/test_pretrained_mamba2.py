"""Memory Caching on transformers' Mamba-2 (mcrnn.pretrained): exactness, decoding, save/load, training, errors.

Tiny random Mamba-2 models built locally (no hub), float64, `n_groups > 1`, lengths that are not multiples of
the model's chunk size (8).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import assert_close  # noqa: E402
from pretrained_helpers import adapted, prefill_and_decode, random_ids  # noqa: E402
from pretrained_helpers import greedy as generate_greedy  # noqa: E402
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM  # noqa: E402

import mcrnn  # noqa: E402
import mcrnn.pretrained as mcp  # noqa: E402

VOCAB = 64
MC_CASES = [
    pytest.param("grm", "checkpoint", id="grm-checkpoint"),
    pytest.param("grm", "independent", id="grm-independent"),
    pytest.param("ssc", "checkpoint", id="ssc-checkpoint"),
    pytest.param("ssc", "independent", id="ssc-independent"),
    pytest.param("mean", "checkpoint", id="mean-checkpoint"),
    pytest.param("mean", "independent", id="mean-independent"),
]


@pytest.fixture(scope="module")
def base_model() -> Mamba2ForCausalLM:
    torch.manual_seed(0)
    cfg = Mamba2Config(num_heads=4, head_dim=8, hidden_size=16, state_size=8, n_groups=2, num_hidden_layers=2,
                       vocab_size=VOCAB, chunk_size=8, expand=2, conv_kernel=4, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    model = Mamba2ForCausalLM(cfg).double().eval()
    with torch.no_grad():  # larger dt than the default init, so that the decay matters over a few tokens
        for block in model.backbone.layers:
            block.mixer.dt_bias.uniform_(-1.0, 1.0)
    return model


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_ids(B, T, VOCAB, seed)


def greedy(model, prompt, use_cache=True, **kw):
    return generate_greedy(model, prompt, 7, use_cache, **kw)


# ---- aggregation="none" is the pretrained model, exactly ---------------------------------------------------

def test_none_equals_original(base_model):
    model = adapted(base_model, aggregation="none", segment_size=5)
    x = ids(2, 21)
    with torch.no_grad():
        ref = base_model(x).logits
        assert_close(model(x).logits, ref, 1e-5, "full forward")
        # left padding: the mask reaches the mixers the same way
        mask = torch.ones_like(x)
        mask[0, :4] = 0
        assert_close(model(x, attention_mask=mask).logits, base_model(x, attention_mask=mask).logits, 1e-5,
                     "padded forward")
    # the original's own prefill + decode path, and ours
    ref_decode = prefill_and_decode(base_model, x, 11)
    ours = prefill_and_decode(model, x, 11)
    assert_close(ours, ref_decode, 1e-5, "prefill + decode vs the original's")
    assert_close(ours, ref, 1e-5, "prefill + decode vs the original forward")
    # the base model without the LM head
    backbone = mcrnn.add_memory_caching(copy.deepcopy(base_model.backbone), aggregation="none", segment_size=5)
    with torch.no_grad():
        assert_close(backbone(x).last_hidden_state, base_model.backbone(x).last_hidden_state, 1e-5, "Mamba2Model")


def test_none_generate_equals_original(base_model):
    model = adapted(base_model, aggregation="none", segment_size=5)
    prompt = ids(2, 10, seed=3)
    a, b = greedy(base_model, prompt), greedy(model, prompt)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert_close(sb, sa, 1e-5, "scores")


# ---- MC on ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation,init", MC_CASES)
def test_mc_decode_equals_forward(base_model, aggregation, init):
    top_k = 2 if aggregation == "ssc" else None
    model = adapted(base_model, aggregation=aggregation, segment_size=4, init=init, top_k=top_k)
    x = ids(2, 23)
    with torch.no_grad():
        # MC must change the output (else the checks below would pass for the base model)
        logits = model(x).logits
        assert (logits - base_model(x).logits).abs().max() > 1e-3 * logits.abs().max()
        full = model(x, output_hidden_states=True).hidden_states[-1]
    # 1e-6: transformers' gated RMSNorm works in float32 even in a float64 model (the MC op itself agrees to
    # ~1e-14 in float64); a wrong segment boundary or a lost cache moves the output by ~1e-2 here
    cache = DynamicCache(config=model.config)
    assert_close(prefill_and_decode(model, x, 7, cache, hidden=True), full, 1e-6, "prefill 7 + decode")
    # the MC state lives in the model's cache, next to the conv state: 23 tokens = 5 full segments of 4
    state = cache.layers[0].mc_state
    assert state.position == 23 and state.num_caches == 5
    assert_close(prefill_and_decode(model, x, 1, hidden=True), full, 1e-6, "prefill 1 + decode")


def test_mc_generate_with_and_without_cache(base_model):
    model = adapted(base_model, aggregation="ssc", segment_size=3, init="independent", top_k=2)
    prompt = ids(2, 9, seed=4)
    a, b = greedy(model, prompt, use_cache=True), greedy(model, prompt, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert_close(sa, sb, 1e-6, "scores")  # float32 logits
    # beam search reorders the MC state with the rest of the cache (without the reorder, the beams differ)
    beam = dict(num_beams=3, num_return_sequences=3, max_new_tokens=10, do_sample=False, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True)
    a, b = model.generate(prompt, use_cache=True, **beam), model.generate(prompt, use_cache=False, **beam)
    assert torch.equal(a.sequences, b.sequences)
    assert_close(a.sequences_scores, b.sequences_scores, 1e-6, "beam scores")


def test_save_load_round_trip(base_model, tmp_path):
    model = adapted(base_model, aggregation="ssc", segment_size=4, init="independent", top_k=2)
    x = ids(2, 15)
    model.save_pretrained(tmp_path)
    loaded = mcp.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(loaded) is Mamba2ForCausalLM
    assert loaded.config.memory_caching == model.config.memory_caching
    assert mcp.memory_caching_settings(loaded) == mcp.MCSettings(
        aggregation="ssc", segment_size=4, init="independent", top_k=2)
    for (n, p), (m, q) in zip(mcp.mc_parameters(model).items(), mcp.mc_parameters(loaded).items()):
        assert n == m and torch.equal(p, q)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model(x).logits)
    # plain transformers loads the backbone only; adding MC again would lose the trained u_proj
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_pretrained"):
        mcrnn.add_memory_caching(plain, aggregation="grm", segment_size=4)
    with pytest.raises(ValueError, match="memory_caching"):
        mcp.from_pretrained(_save_plain(base_model, tmp_path / "plain"))


def _save_plain(model, path):
    model.save_pretrained(path)
    return path


def test_frozen_backbone_training_step(base_model):
    model = adapted(base_model, aggregation="grm", segment_size=4, init="checkpoint").train()
    trainable = mcp.freeze_backbone(model)
    assert sorted(trainable) == [f"backbone.layers.{i}.mixer.u_proj.weight" for i in range(2)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = ids(2, 19)
    model(x, labels=x).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_u_starts_near_uniform(base_model):
    """The neutral start: u_init_std=0 gives grm == mean exactly (uniform weights); the default is close."""
    x = ids(2, 19)
    mean = mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="mean", segment_size=4)
    zero = mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="grm", segment_size=4, u_init_std=0.0)
    default = mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="grm", segment_size=4)
    with torch.no_grad():
        ref = mean(x).logits
        assert_close(zero(x).logits, ref, 1e-12, "u = 0")
        assert_close(default(x).logits, ref, 1e-2, "default u_init_std")
    no_u = mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="grm", segment_size=4, use_u=False)
    assert mcp.mc_parameters(no_u) == {} and mcp.freeze_backbone(no_u) == {}


# ---- errors ----------------------------------------------------------------------------------------------

def test_errors(base_model, monkeypatch):
    with pytest.raises(ValueError, match="Mamba2ForCausalLM"):
        mcrnn.add_memory_caching(torch.nn.Linear(2, 2), aggregation="grm", segment_size=4)
    bad = [
        (dict(aggregation="attention", segment_size=4), "aggregation"),
        (dict(aggregation="grm", segment_size=4, segmentation="boundaries"), "segmentation"),
        (dict(aggregation="ssc", segment_size=4), "top_k"),
        (dict(aggregation="grm", segment_size=4, top_k=2), "top_k"),
        (dict(aggregation="grm", segment_size=0), "segment_size"),
        (dict(aggregation="grm", segment_size=4, init="zeros"), "init"),
    ]
    for settings, name in bad:
        with pytest.raises(ValueError, match=name):
            mcrnn.add_memory_caching(copy.deepcopy(base_model), **settings)
    model = mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="mean", segment_size=4)
    with pytest.raises(ValueError, match="already"):
        mcrnn.add_memory_caching(model, aggregation="mean", segment_size=4)
    with pytest.raises(ValueError, match="no Memory Caching"):
        mcp.mc_parameters(base_model)
    for version in ("4.57.1", "5.0.0", "6.0.0"):
        with pytest.raises(ValueError, match="transformers>="):
            mcp.check_transformers_version(version)
    mcp.check_transformers_version(mcp.TESTED_TRANSFORMERS[0])
    monkeypatch.setattr(mcp, "installed_transformers_version", lambda: "5.0.0")
    with pytest.raises(ValueError, match="transformers>="):
        mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="mean", segment_size=4)


def test_import_mcrnn_ops_stays_light():
    code = ("import sys, mcrnn, mcrnn.ops; assert 'transformers' not in sys.modules; "
            "assert callable(mcrnn.add_memory_caching); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
