"""Single needle in a haystack (S-NIAH-1/2/3, RULER-style, byte level): greedy generation, exact match.

The models train on ``data.seq_len`` bytes with a mix of the variants (``data.task: niah``, see
:mod:`mcrnn.data.niah`); this task measures them at multiples of that length and at evenly spaced needle
depths, on held-out keys and held-out haystacks (the ``split`` plays)::

    eval:
      variants: [1, 2, 3]               # S-NIAH-1 (number in filler), -2 (number in text), -3 (uuid in text)
      length_multipliers: [1, 2, 4, 8]  # context lengths L = multiplier x data.seq_len
      depths: 40                        # evenly spaced in [0, 1] (or an explicit list)
      examples_per_depth: 1
      split: valid                      # haystacks (and the held-out keys): valid or test
      batch_size: 64                    # prompts per generate call

An example of context ``L`` is ``L + 1`` bytes, prompt and answer, like a training row: the model reads ``L``
bytes to emit the whole answer. ``model.generate`` decodes ``len(answer)`` bytes greedily from the prompt with
the model's own cache (the Memory Caching cache, or a KV cache for attention layers), and a prediction counts
when it equals the answer exactly.

Rows: ``{"niah", "seq_len", "length_multiplier", "depth", "accuracy", "byte_accuracy",
"teacher_forced_accuracy", "n", "chance_byte"}``, one per variant x length x depth: ``byte_accuracy`` is the
fraction of generated answer bytes right (a partial credit), ``teacher_forced_accuracy`` the fraction of answer
bytes the model ranks first when it reads the true answer so far (one forward pass, no error compounding),
and ``chance_byte`` a uniform guess among the answer's alphabet (10 digits, 16 hex digits). The needle keys
are the data's (``data.niah_keys``: held-out words, or a fresh random key per example).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcrnn.data import ByteTokenizer, niah_exact_match, niah_example
from mcrnn.data.niah import niah_tensor
from mcrnn.train.config import Config

# the examples are disjoint from training by construction (held-out keys, held-out plays); the seeds only
# have to give every evaluation example its own draw
_EVAL_SEED_BASE = 9_000_011
_TOK = ByteTokenizer()

__all__ = ["depth_grid", "evaluate", "example_seed", "generate_answers", "niah_exact_match"]


def depth_grid(depths: int | Sequence[float]) -> list[float]:
    """``n`` evenly spaced depths in ``[0, 1]`` (both ends included), or an explicit list as given."""
    if isinstance(depths, int):
        if depths < 1:
            raise ValueError(f"eval.depths: must be >= 1, got {depths}")
        return [0.5] if depths == 1 else [i / (depths - 1) for i in range(depths)]
    out = [float(d) for d in depths]
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise ValueError(f"eval.depths: must be an int or a non-empty list in [0, 1], got {depths!r}")
    return out


def example_seed(seed: int, variant: int, seq_len: int, depth_idx: int, example: int) -> int:
    """The generator seed of one evaluation example (distinct per variant, length, depth and example)."""
    return (_EVAL_SEED_BASE + 1_000_003 * seed + 100_003 * variant + 1009 * seq_len + 101 * depth_idx
            + example) % (1 << 31)


@torch.no_grad()
def generate_answers(model, prompts: torch.Tensor, num_new: int, batch_size: int) -> list[str]:
    """Greedy continuations of ``prompts [N, P]`` (equal lengths, no padding), ``num_new`` bytes each."""
    device = next(model.parameters()).device
    outs = []
    for i in range(0, prompts.shape[0], batch_size):
        x = prompts[i:i + batch_size].to(device)
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=num_new,
                           min_new_tokens=num_new, do_sample=False, num_beams=1, pad_token_id=_TOK.pad_id,
                           eos_token_id=None, use_cache=True)
        outs += [_TOK.decode(r) for r in y[:, x.shape[1]:].cpu()]
    return outs


def _byte_accuracy(predictions: list[str], answers: list[str]) -> float:
    right = sum(sum(a == b for a, b in zip(p, t, strict=False)) for p, t in zip(predictions, answers, strict=True))
    return right / max(1, sum(len(t) for t in answers))


@torch.no_grad()
def teacher_forced_hits(model, rows: torch.Tensor, answer_len: int, batch_size: int) -> torch.Tensor:
    """``[N, answer_len]`` bool: whether the model's top byte is the answer's byte at each answer position,
    reading ``rows [N, S]`` (prompt + answer) in one forward pass."""
    device = next(model.parameters()).device
    hits = []
    for i in range(0, rows.shape[0], batch_size):
        x = rows[i:i + batch_size].to(device)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits[:, -answer_len:]
        hits.append((logits.argmax(-1) == x[:, -answer_len:]).cpu())
    return torch.cat(hits)


def evaluate(model, cfg: Config, spec: dict, variant: str) -> list[dict]:
    """S-NIAH exact-match accuracy of one trained run per (niah variant, length, depth); see the module doc."""
    d = cfg.data
    variants = spec.get("variants", [1, 2, 3])
    variants = [variants] if isinstance(variants, int) else list(variants)
    mults = spec.get("length_multipliers", [1, 2, 4, 8])
    depths = depth_grid(spec.get("depths", 40))
    per = int(spec.get("examples_per_depth", 1))
    split = spec.get("split", "valid")
    if split == "train":
        raise ValueError("eval.split: must be a held-out split (valid or test), not train")
    source = spec.get("source", d.source)
    batch_size = int(spec.get("batch_size", 64))
    was_training = model.training
    model.eval()
    rows = []
    for v in variants:
        for m in mults:
            L = int(m * d.seq_len)
            exs = [niah_example(v, L + 1, dep, example_seed(cfg.train.seed, v, L, j, e), split, source,
                                d.niah_keys)
                   for j, dep in enumerate(depths) for e in range(per)]
            rows_t = niah_tensor(exs)
            n_ans = len(exs[0]["answer"])
            prompts = rows_t[:, :-n_ans]
            tf = teacher_forced_hits(model, rows_t, n_ans, batch_size)
            # all depths of one (variant, length) in one batched generate: the prompts have equal lengths
            preds = generate_answers(model, prompts, len(exs[0]["answer"]), batch_size)
            for j, dep in enumerate(depths):
                p = preds[j * per:(j + 1) * per]
                a = [ex["answer"] for ex in exs[j * per:(j + 1) * per]]
                rows.append({"niah": v, "seq_len": L, "length_multiplier": m, "depth": dep,
                             "accuracy": niah_exact_match(p, a), "byte_accuracy": _byte_accuracy(p, a),
                             "teacher_forced_accuracy": float(tf[j * per:(j + 1) * per].float().mean()),
                             "n": per, "chance_byte": 1 / 16 if v == 3 else 1 / 10})
    model.train(was_training)
    return rows
