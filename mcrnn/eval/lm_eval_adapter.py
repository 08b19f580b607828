"""mcrnn models in EleutherAI's lm-evaluation-harness (``pip install "mcrnn[eval]"``).

The harness's model class :class:`MCRNNLM` is registered as ``"mcrnn"``. It loads either a training run
directory (``ckpt.pt``, as written by ``mcrnn train`` / ``mcrnn eval``) or a ``save_pretrained`` directory,
and a tokenizer: ``byte`` (the default, :class:`mcrnn.data.ByteTokenizer`), ``bpe`` (the cached corpus BPE
of ``bpe_vocab_size``, see :func:`mcrnn.data.get_tokenizer`) or the path of a saved BPE ``.json``; for a
run directory without ``tokenizer=`` the run's own ``data.tokenizer`` is used.

Command line (this module registers the model, then runs the harness's own CLI)::

    python -m mcrnn.eval.lm_eval_adapter --model mcrnn \\
        --model_args path=results/text_sample,tokenizer=byte,max_length=2048 --tasks lambada_openai,hellaswag

In a Python process that runs the harness itself, ``from mcrnn.eval.lm_eval_adapter import MCRNNLM`` (or
:func:`register`) registers the model first (the harness only knows its own models otherwise). Python::

    import lm_eval
    from mcrnn.eval.lm_eval_adapter import MCRNNLM
    lm = MCRNNLM(path="results/text_sample")          # or MCRNNLM(model=model, tokenizer=tokenizer)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

``model_args``: ``path`` (alias ``pretrained``), ``tokenizer``, ``bpe_vocab_size``, ``device`` (cpu/cuda),
``dtype`` (float32/bfloat16), ``batch_size``, ``max_length`` (context window of a scored request; default
the config's ``max_position_embeddings``), ``max_gen_toks`` (default 256), ``rolling`` (``state``: the
default, see :func:`rolling_loglikelihood`; ``windows``: the harness's disjoint windows).

``lm_eval`` is imported only when :class:`MCRNNLM` is first used (``import mcrnn.eval`` never imports it);
the scoring itself is in plain functions that need only torch: :func:`score_continuations`,
:func:`rolling_loglikelihood`, :func:`generate_text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# --- scoring (no lm_eval) ----------------------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as the harness's HF model does: trailing spaces of the context move
    to the continuation (BPEs attach a space to the following word), the whole string is encoded once and
    split, so the continuation's tokens are those it has in the joint text. An empty context becomes the
    end-of-text token (every continuation needs a token to be predicted from)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def score_token_pairs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 1,
                      max_len: int | None = None) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` of token-id pairs, in order.

    The input is ``(context + continuation)[:-1]`` (``[B, L]``, left-truncated to ``max_len`` tokens if given):
    the log-probability is the sum over the continuation's tokens of ``log_softmax(logits)`` at the position
    that predicts it, and ``is_greedy`` says that each of them is the argmax there. Requests with inputs of
    the same length run as one batch (no padding, so the numbers are those of a single request).
    """
    if not pairs:
        return []
    device = next(model.parameters()).device
    inputs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if not ctx:
            raise ValueError(f"request {i}: empty context (pass the end-of-text token)")
        full = list(ctx) + list(cont)
        if max_len is not None:
            full = full[-(max_len + 1):]
        inputs.append((full[:-1], list(cont)))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    by_len: dict[int, list[int]] = {}
    for i, (x, _) in enumerate(inputs):
        by_len.setdefault(len(x), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            n = max(len(inputs[i][1]) for i in chunk)  # logits of the last n positions only
            x = torch.tensor([inputs[i][0] for i in chunk], device=device)
            logits = model(x, use_cache=False, logits_to_keep=n).logits.float()  # [b, n, vocab]
            logp = F.log_softmax(logits, dim=-1)
            for row, i in enumerate(chunk):
                cont = inputs[i][1]
                lp = logp[row, n - len(cont):]  # [len(cont), vocab]: the positions predicting cont
                target = torch.tensor(cont, device=device)
                total = lp.gather(-1, target[:, None]).sum().item()
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 1,
                        max_len: int | None = None) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` of ``(context, continuation)`` strings (the harness's
    ``loglikelihood``); tokenized with :func:`encode_pair`, scored with :func:`score_token_pairs`."""
    return score_token_pairs(model, [encode_pair(tokenizer, c, x) for c, x in pairs], batch_size=batch_size,
                             max_len=max_len)


@torch.no_grad()
def rolling_loglikelihood(model, token_ids: Sequence[int], max_len: int, prefix_token: int | None = None,
                          mode: str = "state") -> float:
    """``sum_t log p(x_t | x_<t)`` of a whole text (the harness's ``loglikelihood_rolling``), in windows of
    at most ``max_len`` tokens.

    ``prefix_token`` (e.g. end-of-text) is put before the text so that its first token is scored too;
    without it the first token is the context and is not scored.

    ``mode="state"``: the windows are fed one after another continuing the model's cache, so every token is
    conditioned on the whole text before it and the sum equals that of one forward pass over the whole text
    at the memory of one window (a recurrent model's state is the same size at any length; an attention
    model's KV cache still grows with the text). ``mode="windows"``: the harness's disjoint windows
    (``get_rolling_token_windows`` with ``context_len=1``): each window restarts from an empty state, with
    only the token before it as context, as a fixed-context transformer is scored.
    """
    if mode not in ("state", "windows"):
        raise ValueError(f"mode must be 'state' or 'windows', got {mode!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = ([prefix_token] if prefix_token is not None else []) + [int(t) for t in token_ids]
    if len(ids) < 2:
        return 0.0
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device)[None]  # [1, N]
    total = 0.0
    if mode == "windows":
        # window w predicts tokens [s, e) from inputs [s - 1, e - 1): `max_len` predictions each
        for s in range(1, x.shape[1], max_len):
            e = min(s + max_len, x.shape[1])
            logits = model(x[:, s - 1:e - 1], use_cache=False).logits.float()
            total += F.log_softmax(logits, -1).gather(-1, x[:, s:e, None]).sum().item()
        return total
    cache = None
    for s in range(0, x.shape[1] - 1, max_len):
        e = min(s + max_len, x.shape[1] - 1)  # inputs [s, e) predict tokens [s + 1, e + 1)
        out = model(x[:, s:e], cache=cache, use_cache=True)
        cache = out.cache
        total += F.log_softmax(out.logits.float(), -1).gather(-1, x[:, s + 1:e + 1, None]).sum().item()
    return total


@torch.no_grad()
def generate_text(model, tokenizer, context: str, until: Sequence[str] = (), max_new_tokens: int = 256,
                  temperature: float = 0.0, max_len: int | None = None, generator: torch.Generator | None = None
                  ) -> str:
    """The continuation of ``context`` (greedy, or sampled at ``temperature > 0``), decoded one token at a
    time with the model's cache, cut before the first of the ``until`` strings; stops at end-of-text, at
    such a string or after ``max_new_tokens`` (the harness's ``generate_until``). ``max_len`` left-truncates
    the prompt."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(context) or [tokenizer.eos_id]
    if max_len is not None:
        ids = ids[-max_len:]
    out = model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    new: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        if temperature > 0:
            tok = int(torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            tok = int(logits.argmax())
        if tok == tokenizer.eos_id:
            break
        new.append(tok)
        text = tokenizer.decode(new)
        if any(u and u in text for u in until):
            break
        out = model(torch.tensor([[tok]], device=device), cache=out.cache, use_cache=True)
    cut = min((text.index(u) for u in until if u and u in text), default=len(text))
    return text[:cut]


# --- loading -----------------------------------------------------------------------------------------------


def load_tokenizer(name: str | None = None, bpe_vocab_size: int = 8192, run_config=None):
    """``byte`` | ``bpe`` (the cached corpus BPE) | a saved BPE ``.json`` path; None: the run's own
    ``data.tokenizer`` (``run_config``), else byte."""
    from mcrnn.data.tokenization import get_tokenizer, load_bpe

    if name is None:
        if run_config is not None:
            return get_tokenizer(run_config.data.tokenizer, run_config.data.bpe_vocab_size)
        name = "byte"
    if name in ("byte", "bpe"):
        return get_tokenizer(name, int(bpe_vocab_size))
    if Path(name).suffix == ".json":
        return load_bpe(name)
    raise ValueError(f"tokenizer must be 'byte', 'bpe' or the path of a saved BPE .json, got {name!r}")


def load_mcrnn(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``(model, run_config | None)``: a run directory (``ckpt.pt``) or a ``save_pretrained`` directory."""
    path = Path(path)
    if (path / "ckpt.pt").exists():
        from .common import load_model

        model, cfg = load_model(path, device)
    elif (path / "config.json").exists():
        from mcrnn.models import MCForCausalLM

        model, cfg = MCForCausalLM.from_pretrained(path).to(device).eval(), None
    else:
        raise FileNotFoundError(f"{path}: neither a run directory (ckpt.pt) nor a save_pretrained directory "
                                "(config.json)")
    if dtype is not None:
        model = model.to(dtype)
    return model, cfg


# --- the harness's model class (lm_eval imported here only) ------------------------------------------------


def _int_or(value: Any, default: int) -> int:
    """``batch_size`` and friends arrive as strings from the CLI (``"auto"`` is taken as ``default``)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _build_class():
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError('MCRNNLM needs lm-evaluation-harness: pip install "mcrnn[eval]"') from e

    class MCRNNLM(LM):
        """lm-evaluation-harness model ``"mcrnn"``; arguments: see the module docstring."""

        def __init__(self, path: str | None = None, pretrained: str | None = None, tokenizer=None,
                     bpe_vocab_size: int = 8192, device: str | None = "cpu", dtype: str | None = None,
                     batch_size: int | str = 1, max_length: int | str | None = None, max_gen_toks: int = 256,
                     rolling: str = "state", model=None, **kwargs):
            super().__init__()
            path = path or pretrained
            run_cfg = None
            dt = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
            if model is None:
                if path is None:
                    raise ValueError("pass path=<run or save_pretrained directory> (or model=...)")
                model, run_cfg = load_mcrnn(path, device or "cpu", dt)
            self.model = model.eval()
            self.tokenizer = (tokenizer if tokenizer is not None and not isinstance(tokenizer, str)
                              else load_tokenizer(tokenizer, bpe_vocab_size, run_cfg))
            vocab = self.model.config.vocab_size
            if self.tokenizer.vocab_size > vocab:
                raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids, the model only {vocab}")
            self.batch_size_per_gpu = max(1, _int_or(batch_size, 1))
            self._max_length = _int_or(max_length, self.model.config.max_position_embeddings)
            self.max_gen_toks = int(max_gen_toks)
            self.rolling = rolling

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def device(self) -> torch.device:
            return next(self.model.parameters()).device

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return self.tokenizer.encode(string)

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.tokenizer.decode(tokens)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            args = [r.args for r in requests]
            res = score_continuations(self.model, self.tokenizer, [(c, x) for c, x in args],
                                      batch_size=self.batch_size_per_gpu, max_len=self.max_length)
            for a, r in zip(args, res):
                self.cache_hook.add_partial("loglikelihood", a, r)
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            res = []
            for r in requests:
                (text,) = r.args[:1]
                lp = rolling_loglikelihood(self.model, self.tokenizer.encode(text), self.max_length,
                                           prefix_token=self.eot_token_id, mode=self.rolling)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
                res.append(lp)
            return res

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            res = []
            for r in requests:
                context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                temp = float(kw.get("temperature", 0.0) or 0.0)
                if not kw.get("do_sample", temp > 0):  # as the harness's HF model: greedy unless sampling
                    temp = 0.0
                text = generate_text(self.model, self.tokenizer, context, until=until,
                                     max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)),
                                     temperature=temp, max_len=self.max_length)
                self.cache_hook.add_partial("generate_until", (context, r.args[1] if len(r.args) > 1 else {}),
                                            text)
                res.append(text)
            return res

    MCRNNLM.__module__ = __name__
    MCRNNLM.__qualname__ = "MCRNNLM"
    return register_model("mcrnn")(MCRNNLM)


_CLASS = None


def register():
    """Build :class:`MCRNNLM` (importing lm_eval) and register it as ``"mcrnn"``; returns the class."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


def __getattr__(name: str):
    # the class (and the lm_eval import) is built on first use, so this module imports without lm_eval
    if name == "MCRNNLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """``python -m mcrnn.eval.lm_eval_adapter ARGS``: ``lm_eval ARGS`` with the ``"mcrnn"`` model registered."""
    import sys

    register()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:  # pragma: no cover - older layouts
        from lm_eval.main import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
