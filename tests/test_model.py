"""MCConfig / MCForCausalLM: every mixer and memory, the loss, save/load, post-training MC, config checks,
hybrids, Auto classes."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from mcrnn import MCConfig, MCForCausalLM, MCModel
from mcrnn.layers import Attention, MemoryCachingAttention
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
     ("memory_depth", 3), ("head_dim", 0), ("norm_eps", 0.0), ("use_u", "yes")],
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
