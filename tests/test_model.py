"""MCConfig / MCForCausalLM: every mixer and memory, the loss, save/load, post-training MC, config checks,
hybrids, Auto classes."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from mcrnn import MCConfig, MCForCausalLM, MCModel
from mcrnn.layers import Attention, MemoryCachingAttention
from mcrnn.models import causal_lm_loss
from mcrnn.ops import get_memory

V = 64


def tiny(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2, segment_size=4, mini_batch=2)
    base.update(kw)
    return MCConfig(**base)


def _skip_unregistered(memory):
    try:
        get_memory(memory)
    except ValueError:
        pytest.skip(f"memory {memory!r} is not registered")


@pytest.mark.parametrize(
    "mixer,memory,aggregation",
    [("mc", "linear", "grm"), ("mc", "linear", "none"), ("mc", "swla", "soup"), ("mc", "linear", "ssc"),
     ("mc", "dla", "grm"), ("mc", "titans", "residual"), ("attention", "linear", "grm")],
)
def test_forward_backward_and_loss(mixer, memory, aggregation):
    _skip_unregistered(memory)
    torch.manual_seed(0)
    cfg = tiny(mixer=mixer, memory=memory, aggregation=aggregation, top_k=1)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, MCForCausalLM)
    ids = torch.randint(0, V, (2, 11))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 11, V)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    # the summed loss over `num_items_in_batch` (HF Trainer, gradient accumulation)
    n = int((labels[:, 1:] != -100).sum())
    s = model(ids, labels=labels, num_items_in_batch=2 * n).loss
    torch.testing.assert_close(s, ref / 2)


def test_causal_lm_loss_label_conventions_agree():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 9
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    labels[2, -1] = -100
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    per_position = causal_lm_loss(logits, labels, reduction="none")
    assert per_position.shape == (B, T) and per_position.dtype == torch.float32
    # position t scores token t + 1 in float32; ignored targets and the last position score 0
    logp = torch.log_softmax(logits.float(), -1)
    for b in range(B):
        for t in range(T):
            want = 0.0 if shifted[b, t] == -100 else -float(logp[b, t, shifted[b, t]])
            assert float(per_position[b, t]) == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert torch.equal(per_position, causal_lm_loss(logits, shift_labels=shifted, reduction="none"))
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(causal_lm_loss(logits, labels, reduction=reduction),
                                   causal_lm_loss(logits, shift_labels=shifted, reduction=reduction))
    n = int((shifted != -100).sum())
    torch.testing.assert_close(causal_lm_loss(logits, labels), per_position.sum() / n)
    torch.testing.assert_close(causal_lm_loss(logits, labels, reduction="sum"), per_position.sum())


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"labels": torch.zeros(2, 5, dtype=torch.long), "shift_labels": torch.zeros(2, 5, dtype=torch.long)},
     "exactly one"),
    ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "`labels` must have the shape"),
    ({"shift_labels": torch.zeros(5, 2, dtype=torch.long)}, "`shift_labels` must have the shape"),
    ({"labels": torch.zeros(2, 5, dtype=torch.long), "reduction": "avg"}, "`reduction`"),
])
def test_causal_lm_loss_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        causal_lm_loss(torch.zeros(2, 5, V), **kwargs)


def test_mixers_are_the_configured_layers():
    model = MCForCausalLM(tiny(num_hidden_layers=3, mixer=["mc", "attention", "mc"]))
    kinds = [type(b.attn) for b in model.model.layers]
    assert kinds == [MemoryCachingAttention, Attention, MemoryCachingAttention]
    ids = torch.randint(0, V, (2, 9))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_logits_to_keep_and_tuple_outputs():
    torch.manual_seed(0)
    model = MCForCausalLM(tiny()).eval()
    ids = torch.randint(0, V, (2, 9))
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])
    out = model(ids, labels=ids, logits_to_keep=1)  # the loss still uses every position
    torch.testing.assert_close(out.loss, model(ids, labels=ids).loss)
    tup = model(ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(tup[0], full)
    hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == 3 and hs[0].shape == (2, 9, 32)


def test_tied_embeddings():
    model = MCForCausalLM(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = MCForCausalLM(tiny())
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("memory", ["linear", "titans"])
def test_save_load_round_trip(tmp_path, memory):
    _skip_unregistered(memory)
    torch.manual_seed(0)
    model = MCForCausalLM(tiny(memory=memory, mixer=["mc", "attention"], aggregation="ssc", top_k=2)).eval()
    ids = torch.randint(0, V, (2, 13))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, MCConfig) and cfg.mixer == ["mc", "attention"] and cfg.top_k == 2
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, MCForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)
    # the SSC router size is not the sampling top_k of the generation config
    assert loaded.generation_config.top_k in (None, 50)
    assert MCForCausalLM.from_pretrained(tmp_path, top_k=3).generation_config.top_k in (None, 50)


def test_post_training_mc_at_load_time(tmp_path):
    """A model trained as the base RNN (aggregation none) loads with `mean` + `independent` segments of the
    training length: the same parameters, the base model within one segment, a different model beyond."""
    torch.manual_seed(0)
    L = 6
    base = MCForCausalLM(tiny(aggregation="none", segment_size=256)).eval()
    base.save_pretrained(tmp_path)
    mc, info = MCForCausalLM.from_pretrained(
        tmp_path, aggregation="mean", init="independent", segment_size=L, output_loading_info=True
    )
    mc.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert mc.config.aggregation == "mean" and mc.model.layers[0].attn.segment_size == L
    ids = torch.randint(0, V, (2, 15))
    b, m = base(ids).logits, mc(ids).logits
    torch.testing.assert_close(m[:, :L], b[:, :L], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m[:, L:], b[:, L:], atol=1e-4)
    with pytest.raises(ValueError, match="aggregation"):
        MCForCausalLM.from_pretrained(tmp_path, aggregation="bogus")


@pytest.mark.parametrize(
    "field,value",
    [("mixer", "rnn"), ("mixer", ["mc"]), ("memory", "gru"), ("aggregation", "max"),
     ("segmentation", "boundaries"), ("init", "zeros"), ("segment_size", 0), ("num_heads", 0),
     ("hidden_size", 3.5), ("expand_v", -1.0),
     ("memory_depth", 3), ("head_dim", 0), ("norm_eps", 0.0), ("use_u", "yes"), ("attention_conv_size", -1)],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_config_cross_field_checks():
    with pytest.raises(ValueError, match="top_k"):
        tiny(aggregation="ssc")
    with pytest.raises(ValueError, match="mini_batch"):
        tiny(memory="dla", segment_size=6, mini_batch=4)
    with pytest.raises(ValueError, match="expand_v"):
        tiny(memory="titans", expand_v=2.0)
    with pytest.raises(ValueError, match="head_dim"):
        tiny(mixer="attention", head_dim=5)
    tiny(memory="linear", segment_size=6, mini_batch=4)  # mini_batch only binds deep memories
    cfg = tiny()
    cfg.aggregation = "bogus"  # fields changed after construction are checked by the model
    with pytest.raises(ValueError, match="aggregation"):
        MCModel(cfg)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = MCForCausalLM(tiny(mixer=["mc", "attention"]))
    ids = torch.randint(0, V, (2, 10))
    model.train()
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)


def test_bfloat16_forward():
    torch.manual_seed(0)
    model = MCForCausalLM(tiny(mixer=["mc", "attention"])).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


# --- input-only cache scores (the ablation of context-dependent gates) ----------------------------------

@pytest.mark.parametrize("aggregation, segmentation", [("grm", "constant"), ("ssc", "logarithmic")])
def test_input_only_cache_scores(tmp_path, aggregation, segmentation):
    torch.manual_seed(0)
    cfg = tiny(aggregation=aggregation, segmentation=segmentation, top_k=1, segment_size=3, cache_scores="input",
               pad_token_id=0)
    model = MCForCausalLM(cfg)
    attn = model.model.layers[0].attn
    assert attn.cache_scores == "input" and attn.u_proj.out_features == cfg.num_heads  # one slope per head
    ids = torch.randint(1, V, (2, 14))
    model(ids, labels=ids).loss.backward()
    assert attn.u_proj.weight.grad.abs().max() > 0  # the scores are read
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad
    model.eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial scores, so that wrong positions show in the logits
            p.add_(0.1 * torch.randn_like(p))
        full = model(ids).logits
        # decoding from a cache: positions continue from the cache's length
        out = model(ids[:, :5], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
        torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-5)
        gen = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        seq = gen.sequences
        torch.testing.assert_close(torch.stack(gen.logits, 1), model(seq).logits[:, 5:-1], rtol=1e-4, atol=1e-5)
        assert torch.equal(seq, model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=False))
    assert "cache_scores='input'" in repr(attn)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).cache_scores == "input"
    loaded, info = MCForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.cache_scores == "input" and loaded.model.layers[0].attn.cache_scores == "input"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, full)


def test_cache_scores_checks_name_the_field():
    assert tiny().cache_scores == "context"
    for kw in (dict(cache_scores="position"), dict(cache_scores="input", aggregation="mean"),
               dict(cache_scores="input", aggregation="none"), dict(cache_scores="input", use_u=False)):
        with pytest.raises(ValueError, match="cache_scores"):
            tiny(**kw)
    cfg = tiny(cache_scores="input")
    cfg.aggregation = "residual"  # changed after construction: checked by the model
    with pytest.raises(ValueError, match="cache_scores"):
        MCModel(cfg)
    with pytest.raises(ValueError, match="cache_scores"):
        MemoryCachingAttention(32, 2, aggregation="grm", cache_scores="bogus")
