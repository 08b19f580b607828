"""`torch.compile` over a whole model: a training step and a decode step match eager (CPU).

The CI suite traces with the `aot_eager` backend (Dynamo + AOTAutograd, the graphs inductor would compile)
to stay fast; `-m slow` compiles with inductor too. The forward of a Memory Caching model is one graph: the
op's host-side planning is Python over segments, which Dynamo runs at trace time."""

import pytest
import torch

from mcrnn.layers import MCCache
from mcrnn.models import MCConfig, MCForCausalLM


def _model(aggregation):
    torch.manual_seed(0)
    cfg = MCConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, segment_size=8,
                   aggregation=aggregation, top_k=2 if aggregation == "ssc" else None)
    return MCForCausalLM(cfg)


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    # the compiled module wraps the same parameters (names prefixed with `_orig_mod.`)
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _check(model, compiled):
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(1))
    loss, grads = _train_step(model, ids)
    loss_c, grads_c = _train_step(compiled, ids)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_c.keys()
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-5, msg=n)
    # decode: prefill with the cache, then one token at a time
    with torch.no_grad():
        logits = {}
        for name, m in (("eager", model), ("compiled", compiled)):
            cache = MCCache(model.config)
            m(ids[:, :21], past_key_values=cache, use_cache=True)
            logits[name] = [m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(21, 26)]
        for a, b in zip(logits["compiled"], logits["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
def test_compiled_model_matches_eager(aggregation):
    model = _model(aggregation)
    _check(model, torch.compile(model, backend="aot_eager"))


def test_model_forward_is_one_graph():
    model = _model("grm")
    ids = torch.randint(0, 64, (2, 30))
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    model = _model("grm")
    _check(model, torch.compile(model))
