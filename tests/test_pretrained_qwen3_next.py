"""Memory Caching on transformers' Qwen3-Next (mcrnn.pretrained): exactness, decoding, save/load, training, errors.

Tiny random hybrid models built locally (no hub), float64: Gated DeltaNet layers 0 and 2 (4 value heads served by
2 key heads), a full-attention layer 1, an MoE block (eager experts) and a dense MLP; lengths that are not
multiples of the model's chunk size (64). Only the Gated DeltaNet layers get Memory Caching.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import assert_close  # noqa: E402
from pretrained_helpers import adapted, prefill_and_decode, random_ids  # noqa: E402
from pretrained_helpers import greedy as generate_greedy  # noqa: E402
from transformers import DynamicCache, Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet  # noqa: E402

import mcrnn  # noqa: E402
import mcrnn.pretrained as mcp  # noqa: E402
from mcrnn.pretrained.qwen3_next import MemoryCachingQwen3NextGatedDeltaNet  # noqa: E402

VOCAB = 64
GDN_LAYERS = (0, 2)
MC_CASES = [
    pytest.param("grm", "checkpoint", id="grm-checkpoint"),
    pytest.param("ssc", "independent", id="ssc-independent"),
    pytest.param("mean", "checkpoint", id="mean-checkpoint"),
]


@pytest.fixture(scope="module")
def base_model() -> Qwen3NextForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        mlp_only_layers=[2], experts_implementation="eager", attn_implementation="eager",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen3NextForCausalLM(cfg).double().eval()
    with torch.no_grad():  # decays of a few tokens' reach (the default A up to 16 forgets within a token)
        for i in GDN_LAYERS:
            mixer = model.model.layers[i].linear_attn
            mixer.A_log.uniform_(math.log(0.05), math.log(0.5))
            mixer.dt_bias.uniform_(-1.0, 1.0)
    return model


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_ids(B, T, VOCAB, seed)


def greedy(model, prompt, use_cache=True, **kw):
    return generate_greedy(model, prompt, 6, use_cache, **kw)


def test_adapts_only_the_gated_deltanet_layers(base_model):
    model = adapted(base_model, aggregation="grm", segment_size=4)
    for i, layer in enumerate(model.model.layers):
        if i in GDN_LAYERS:
            assert type(layer.linear_attn) is MemoryCachingQwen3NextGatedDeltaNet
        else:
            assert not hasattr(layer, "linear_attn")
            assert type(layer.self_attn) is type(base_model.model.layers[i].self_attn)
    assert sorted(mcp.mc_parameters(model)) == [f"model.layers.{i}.linear_attn.u_proj.weight" for i in GDN_LAYERS]
    assert mcp.mc_parameters(model)["model.layers.0.linear_attn.u_proj.weight"].shape == (4 * 8, 32)
    assert type(base_model.model.layers[0].linear_attn) is Qwen3NextGatedDeltaNet  # the copy, not the original


# ---- aggregation="none" is the pretrained model, exactly ---------------------------------------------------

def test_none_equals_original(base_model):
    model = adapted(base_model, aggregation="none", segment_size=5)
    x = ids(2, 70)  # > one chunk of 64, not a multiple of it
    # 1e-5: transformers runs the recurrence in float32 even in a float64 model; ours runs in float64
    with torch.no_grad():
        ref = base_model(x).logits
        assert_close(model(x).logits, ref, 1e-5, "full forward")
        mask = torch.ones_like(x)  # right padding: the mask reaches the mixers the same way
        mask[0, -4:] = 0
        assert_close(model(x, attention_mask=mask).logits, base_model(x, attention_mask=mask).logits, 1e-5,
                     "right-padded forward")
        # left padding in float32: in float64, transformers' own model turns a left-padded row into NaN
        # (transformers 5.24; its padded attention rows), so the comparison runs where the original is finite
        mask = torch.ones_like(x)
        mask[0, :4] = 0
        base32, model32 = copy.deepcopy(base_model).float(), copy.deepcopy(model).float()
        ref32 = base32(x, attention_mask=mask).logits
        assert ref32.isfinite().all()
        assert_close(model32(x, attention_mask=mask).logits, ref32, 1e-4, "left-padded forward, float32")
    ref_decode = prefill_and_decode(base_model, x, 66)  # the original's own prefill + decode, and ours
    ours = prefill_and_decode(model, x, 66)
    assert_close(ours, ref_decode, 1e-5, "prefill + decode vs the original's")
    assert_close(ours, ref, 1e-5, "prefill + decode vs the original forward")
    inner = mcrnn.add_memory_caching(copy.deepcopy(base_model.model), aggregation="none", segment_size=5)
    with torch.no_grad():
        assert_close(inner(x[:, :21]).last_hidden_state, base_model.model(x[:, :21]).last_hidden_state, 1e-5,
                     "Qwen3NextModel")


def test_none_generate_equals_original(base_model):
    model = adapted(base_model, aggregation="none", segment_size=5)
    prompt = ids(2, 11, seed=3)
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
    # 1e-6: transformers' gated RMSNorm works in float32 even in a float64 model; a wrong segment boundary or a
    # lost cache moves the output far more
    cache = DynamicCache(config=model.config)
    assert_close(prefill_and_decode(model, x, 7, cache, hidden=True), full, 1e-6, "prefill 7 + decode")
    # the MC state lives in the model's cache, next to the conv state: 23 tokens = 5 full segments of 4
    for i in GDN_LAYERS:
        state = cache.layers[i].mc_state
        assert state.position == 23 and state.num_caches == 5
    assert not hasattr(cache.layers[1], "mc_state")
    assert_close(prefill_and_decode(model, x, 1, hidden=True), full, 1e-6, "prefill 1 + decode")


def test_mc_generate_with_and_without_cache(base_model):
    model = adapted(base_model, aggregation="ssc", segment_size=3, init="independent", top_k=2)
    prompt = ids(2, 9, seed=4)
    a, b = greedy(model, prompt, use_cache=True), greedy(model, prompt, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert_close(sa, sb, 1e-6, "scores")
    # beam search reorders the MC state with the conv and attention caches
    beam = dict(num_beams=3, num_return_sequences=3, max_new_tokens=6, do_sample=False, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True)
    a, b = model.generate(prompt, use_cache=True, **beam), model.generate(prompt, use_cache=False, **beam)
    assert torch.equal(a.sequences, b.sequences)
    assert_close(a.sequences_scores, b.sequences_scores, 1e-6, "beam scores")


def test_save_load_round_trip(base_model, tmp_path):
    model = adapted(base_model, aggregation="ssc", segment_size=4, init="independent", top_k=2)
    x = ids(2, 15)
    model.save_pretrained(tmp_path)
    # kwargs reach transformers' loader (the attention implementation is not saved in the config)
    loaded = mcp.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager",
                                 experts_implementation="eager")
    assert type(loaded) is Qwen3NextForCausalLM
    assert mcp.memory_caching_settings(loaded) == mcp.MCSettings(
        aggregation="ssc", segment_size=4, init="independent", top_k=2)
    for (n, p), (m, q) in zip(mcp.mc_parameters(model).items(), mcp.mc_parameters(loaded).items()):
        assert n == m and torch.equal(p, q)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model(x).logits)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_pretrained"):
        mcrnn.add_memory_caching(plain, aggregation="grm", segment_size=4)


def test_frozen_backbone_training_step(base_model):
    model = adapted(base_model, aggregation="grm", segment_size=4, init="checkpoint").train()
    trainable = mcp.freeze_backbone(model)
    assert sorted(trainable) == [f"model.layers.{i}.linear_attn.u_proj.weight" for i in GDN_LAYERS]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = ids(2, 19)
    model(x, labels=x).loss.backward()
    assert all(trainable[n].grad.abs().sum() > 0 for n in trainable)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


# ---- errors ----------------------------------------------------------------------------------------------

def test_errors(base_model):
    bad = [
        (dict(aggregation="attention", segment_size=4), "aggregation"),
        (dict(aggregation="ssc", segment_size=4), "top_k"),
        (dict(aggregation="grm", segment_size=0), "segment_size"),
        (dict(aggregation="grm", segment_size=4, init="zeros"), "init"),
    ]
    for settings, name in bad:
        with pytest.raises(ValueError, match=name):
            mcrnn.add_memory_caching(copy.deepcopy(base_model), **settings)
    model = mcrnn.add_memory_caching(copy.deepcopy(base_model), aggregation="mean", segment_size=4)
    with pytest.raises(ValueError, match="already"):
        mcrnn.add_memory_caching(model, aggregation="mean", segment_size=4)
    # a cache that already holds a state written without MC
    cache = DynamicCache(config=base_model.config)
    with torch.no_grad():
        base_model(ids(2, 5), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="without Memory Caching"):
            model(ids(2, 1), cache=cache, use_cache=True)
