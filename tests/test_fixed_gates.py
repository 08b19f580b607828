"""Gates held at their default instead of learned (`fixed_gates`): no projection, the op's "gate not given"
value, padding and decoding unchanged; bad names are refused with the gate list."""

from __future__ import annotations

import pytest
import torch

from mcrnn.layers import MemoryCachingAttention
from mcrnn.models import MCConfig, MCForCausalLM
from mcrnn.ops import MCSpec


@pytest.mark.parametrize("aggregation,init", [("none", "checkpoint"), ("grm", "independent"), ("mean", "independent")])
def test_fixed_decay_equals_a_decay_gate_saturated_at_one(aggregation, init):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_heads=2, head_dim=8, memory="linear", aggregation=aggregation, segment_size=7,
              init=init)
    fixed = MemoryCachingAttention(**kw, fixed_gates=("decay",)).double()
    learned = MemoryCachingAttention(**kw).double()
    assert "decay" not in fixed.gates and "decay" in learned.gates
    missing, unexpected = learned.load_state_dict(fixed.state_dict(), strict=False)
    assert set(missing) == {"gates.decay.weight", "gates.decay.bias"} and not unexpected
    with torch.no_grad():  # sigmoid(1e4) is exactly 1.0: a decay of one, i.e. none
        learned.gates["decay"].weight.zero_()
        learned.gates["decay"].bias.fill_(1e4)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(fixed(x)[0], learned(x)[0], rtol=1e-12, atol=1e-12)


def test_fixed_gates_model_decodes_like_its_forward_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = MCConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=2, aggregation="ssc", top_k=2,
                   segment_size=5, fixed_gates=["decay"])
    model = MCForCausalLM(cfg).eval()
    assert not any(".gates.decay." in n for n, _ in model.named_parameters())
    x = torch.randint(0, 40, (2, 23))
    full = model(input_ids=x).logits
    out = model(input_ids=x[:, :11], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(11, 23):
        out = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    again = MCForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.fixed_gates == ["decay"]
    torch.testing.assert_close(again(input_ids=x).logits, full)


@pytest.mark.parametrize("fixed,match", [(["beta"], r"memory 'linear' has no gate 'beta' \(its gates: \['decay'\]\)"),
                                         ("decay", "must be a list of gate names")])
def test_bad_fixed_gates_name_the_field(fixed, match):
    with pytest.raises(ValueError, match=r"`fixed_gates`"):
        MCSpec(fixed_gates=fixed)
    with pytest.raises(ValueError, match=match):
        MCConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_heads=2, fixed_gates=fixed)
    assert MCSpec(memory="gdn", fixed_gates=["decay", "decay"]).fixed_gates == ("decay",)
