"""Language modelling on held-out text: perplexity, loss by position, associative-recall hits, extrapolation.

A run trained on windows of ``L = data.seq_len`` tokens is measured on the held-out split of the same corpus
and tokenizer (``data.source``/``data.tokenizer``)::

    eval:
      split: valid                     # corpus split (train | valid | test)
      position_buckets: 8              # equal buckets of [0, L), or explicit edges [0, 16, 64, 256]
      num_windows: null                # windows of L for ppl/position/AR rows (null: the whole split)
      length_multipliers: [1, 2, 4, 8] # extrapolation: windows of m * L
      max_windows: 64                  # extrapolation: at most this many windows of the largest m * L
      batch_tokens: 16384              # tokens per forward batch (windows per batch = batch_tokens // length)
      post_training: [mean]            # post-training MC read on a base trained without MC: mean, residual,
                                       # or {online_weight: w} (mean with the online read's share fixed at w)

Rows (all losses are mean next-token NLL in nats, token-weighted over every window):

- ``{"metric": "ppl", "seq_len": L, "value", "loss", "tokens"}``: ``exp`` of the mean NLL on windows of L;
- ``{"metric": "loss_by_position", "seq_len", "bucket_start", "bucket_end", "value", "tokens"}``: mean NLL of
  the predictions made at positions ``[bucket_start, bucket_end)`` of a window;
- ``{"metric": "ar_hit_loss" | "other_loss" | "ar_hit_fraction", "seq_len", "value", "tokens"}``: Zoology's
  associative-recall split (Arora et al. 2023, :func:`ar_hit_mask`): the loss on the targets whose bigram
  already occurred earlier in the window (which a model with perfect recall could copy), on the others, and
  the share of hits;
- ``{"metric": "ppl_extrapolation", "seq_len": m * L, "multiplier": m, "mode", "value", "loss", "tokens",
  "windows"}`` with ``mode`` ``"as_trained"``, and for a recurrent model trained without Memory Caching
  (``aggregation: none``) also ``"post_training_mc"``: the same weights read with the ``mean`` aggregation
  over ``independent`` segments of L (SPEC §2.3, :func:`with_post_training_mc`), and with
  ``post_training: [mean, residual]`` also ``"post_training_residual"`` (the sum instead of the mean: with the
  per-head RMSNorm after the read the two differ only in the norm's epsilon, which this measures), and with
  ``{online_weight: w}`` ``"post_training_online<w>"`` (the online read keeps the share ``w`` instead of
  ``1/(N+1)``). Attention
  models keep their RoPE as it is. Every multiplier is measured on the *same* tokens (the first ``W · M · L``
  of the split, ``M`` the largest multiplier that fits, ``W <= max_windows``), so the rows differ only in the
  context the model gets, not in the text. Multipliers with no full window in the split are skipped.

A transformers checkpoint (``mcrnn eval lm --model PATH``, :func:`mcrnn.eval.common.run_checkpoint`) gets the
same rows, per variant ``no_mc`` / ``mc``, with ``L = data.seq_len`` of the experiment file
(``configs/pretrained/lm.yaml`` by default).
"""

from __future__ import annotations

import copy
import math

import torch

from mcrnn.data import IGNORE_INDEX, TextDataset, get_tokenizer, pack_causal
from mcrnn.models import MCForCausalLM, causal_lm_loss
from mcrnn.train.config import Config

DEFAULT_MULTIPLIERS = (1, 2, 4, 8)


# --- associative-recall hits ---------------------------------------------------------------------------------


def ar_hit_mask(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Which predictions are associative-recall hits (Zoology, Arora et al. 2023). ``[N, L] -> bool [N, L]``.

    The prediction at position ``t`` (of target ``y_t``, by default ``x_{t+1}``) is a hit when the bigram
    ``(x_t, y_t)`` already occurred at an earlier position ``j < t`` of the same row: ``x_j == x_t`` and
    ``y_j == y_t``. Its first occurrence is not a hit.

    Args:
        input_ids: ``x`` ``[N, L]`` integer tokens.
        labels: ``y`` ``[N, L]``, the shifted targets (``-100``: no target, never a hit and never matched).
            Default ``input_ids[:, 1:]``; the last position then has no target and is ``False``.

    Runs in ``O(N L log L)`` tensor ops: each bigram gets one integer code, a stable sort per row puts equal
    codes next to each other in their original order, and every element of a run but its first is a repeat.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, L], got shape {tuple(input_ids.shape)}")
    x = input_ids.long()
    if labels is None:
        y = torch.full_like(x, IGNORE_INDEX)
        y[:, :-1] = x[:, 1:]
    else:
        if labels.shape != x.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(x.shape)}, got {tuple(labels.shape)}")
        y = labels.long()
    N, L = x.shape
    if L == 0:
        return torch.zeros(N, 0, dtype=torch.bool, device=x.device)
    valid = y != IGNORE_INDEX
    base = int(torch.maximum(x.max(), y.max()).item()) + 1
    if base > (1 << 31):  # base**2 must fit in int64 (token ids never come close)
        raise ValueError(f"token ids up to {base - 1} are too large for the bigram code")
    code = x * base + y.clamp_min(0)
    # a position without a target gets a code of its own (negative: no real bigram has one)
    pos = torch.arange(L, device=x.device).expand(N, L)
    code = torch.where(valid, code, -1 - pos)
    sorted_code, order = torch.sort(code, dim=1, stable=True)
    repeat = torch.zeros_like(sorted_code, dtype=torch.bool)
    repeat[:, 1:] = sorted_code[:, 1:] == sorted_code[:, :-1]
    hit = torch.zeros_like(repeat).scatter_(1, order, repeat)
    return hit & valid


def ar_hit_mask_reference(input_ids, labels=None) -> torch.Tensor:
    """:func:`ar_hit_mask` as a plain Python loop over positions (for tests). ``[N, L] -> bool [N, L]``."""
    x = torch.as_tensor(input_ids).tolist()
    out = []
    for n, row in enumerate(x):
        ys = torch.as_tensor(labels)[n].tolist() if labels is not None else row[1:] + [IGNORE_INDEX]
        seen, hits = set(), []
        for a, b in zip(row, ys, strict=True):
            if b == IGNORE_INDEX:
                hits.append(False)
                continue
            hits.append((a, b) in seen)
            seen.add((a, b))
        out.append(hits)
    return torch.tensor(out, dtype=torch.bool).reshape(len(x), -1)


# --- metrics from arrays -------------------------------------------------------------------------------------


def bucket_edges(buckets: int | list[int], seq_len: int) -> list[int]:
    """Position-bucket edges ``[e_0 = 0, …, e_B = L]``: ``buckets`` equal buckets, or explicit edges."""
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"position_buckets must be >= 1, got {buckets}")
        b = min(buckets, seq_len)
        return [round(i * seq_len / b) for i in range(b + 1)]
    edges = [int(e) for e in buckets]
    if edges[0] != 0:
        edges = [0] + edges
    if edges[-1] < seq_len:
        edges = edges + [seq_len]
    edges = [e for e in edges if e <= seq_len]
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"position_buckets edges must increase, got {buckets}")
    return edges


class LMStats:
    """Token-weighted sums for the metrics of windows of one length, accumulated batch by batch."""

    def __init__(self, seq_len: int, buckets: int | list[int] = 8):
        self.seq_len = seq_len
        self.edges = bucket_edges(buckets, seq_len)
        nb = len(self.edges) - 1
        # bucket of every position, so one scatter_add per batch sums all buckets
        self.pos_bucket = torch.bucketize(torch.arange(seq_len), torch.tensor(self.edges[1:]), right=True)
        self.sums = {"all": 0.0, "hit": 0.0, "other": 0.0}
        self.counts = {"all": 0, "hit": 0, "other": 0}
        self.bucket_sum = torch.zeros(nb, dtype=torch.float64)
        self.bucket_count = torch.zeros(nb, dtype=torch.float64)

    def add(self, nll: torch.Tensor, valid: torch.Tensor, hits: torch.Tensor | None = None) -> None:
        """Add a batch: ``nll, valid, hits: [N, L]`` (``hits`` may be None when only ppl is wanted)."""
        nll = nll.double() * valid
        self.sums["all"] += nll.sum().item()
        self.counts["all"] += int(valid.sum())
        pos_sum, pos_count = nll.sum(0).cpu(), valid.sum(0).double().cpu()
        self.bucket_sum.scatter_add_(0, self.pos_bucket, pos_sum)
        self.bucket_count.scatter_add_(0, self.pos_bucket, pos_count)
        if hits is not None:
            hits = hits & valid
            other = valid & ~hits
            self.sums["hit"] += (nll * hits).sum().item()
            self.counts["hit"] += int(hits.sum())
            self.sums["other"] += (nll * other).sum().item()
            self.counts["other"] += int(other.sum())

    def _mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts[key] else float("nan")

    def result(self) -> dict:
        """``{"loss", "ppl", "tokens", "loss_by_position": [{"bucket_start", "bucket_end", "value", "tokens"}],
        "ar_hit_loss", "other_loss", "ar_hit_fraction", "ar_hit_tokens", "other_tokens"}``."""
        loss = self._mean("all")
        by_pos = []
        for i in range(len(self.edges) - 1):
            c = float(self.bucket_count[i])
            by_pos.append({"bucket_start": self.edges[i], "bucket_end": self.edges[i + 1],
                           "value": float(self.bucket_sum[i]) / c if c else float("nan"), "tokens": int(c)})
        n = self.counts["all"]
        return {"loss": loss, "ppl": math.exp(loss) if n else float("nan"), "tokens": n,
                "loss_by_position": by_pos, "ar_hit_loss": self._mean("hit"), "other_loss": self._mean("other"),
                "ar_hit_fraction": self.counts["hit"] / n if n else float("nan"),
                "ar_hit_tokens": self.counts["hit"], "other_tokens": self.counts["other"]}


def lm_metrics(logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor,
               buckets: int | list[int] = 8) -> dict:
    """All the metrics of :class:`LMStats` from one set of arrays.

    Args:
        logits: ``[N, L, V]``; labels: ``[N, L]`` shifted targets (``-100`` ignored); input_ids: ``[N, L]``.
        buckets: number of equal position buckets of ``[0, L)``, or explicit edges.
    """
    stats = LMStats(labels.shape[1], buckets)
    nll = causal_lm_loss(logits, shift_labels=labels, reduction="none")
    stats.add(nll, labels != IGNORE_INDEX, ar_hit_mask(input_ids, labels))
    return stats.result()


# --- post-training Memory Caching ----------------------------------------------------------------------------


POST_TRAINING = {"mean": "post_training_mc", "residual": "post_training_residual"}


def post_training_modes(entries) -> list[tuple[str, str, float | None]]:
    """``[(mode, aggregation, online_weight)]`` of ``eval.post_training`` entries (see the module docstring)."""
    out = []
    for e in entries:
        if isinstance(e, dict) and set(e) == {"online_weight"}:
            w = e["online_weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
                raise ValueError(f"eval.post_training: online_weight must be a number in (0, 1], got {w!r}")
            out.append((f"post_training_online{w:g}", "mean", float(w)))
        elif isinstance(e, str) and e in POST_TRAINING:
            out.append((POST_TRAINING[e], e, None))
        else:
            raise ValueError(f"eval.post_training: unknown entry {e!r} (choose from {list(POST_TRAINING)} or "
                             f"{{online_weight: w}})")
    return out


def with_post_training_mc(model, segment_size: int, aggregation: str = "mean", online_weight: float | None = None):
    """The same weights read with post-training Memory Caching (SPEC §2.3): a new model, in eval mode.

    Rebuilds ``model`` (an :class:`~mcrnn.models.MCForCausalLM` trained without MC, ``aggregation="none"``)
    with ``aggregation="mean"`` (or ``"residual"``), ``init="independent"``, constant segments of
    ``segment_size`` (the training length), and loads its state dict strictly: ``none`` and ``mean`` have the
    same parameters, so every weight is reused and nothing new is initialised. On inputs of at most
    ``segment_size`` tokens the new model equals the old one (one segment: the mean of one memory).
    """
    cfg = model.config
    if "mc" not in cfg.layer_mixers:
        raise ValueError("post-training MC needs at least one recurrent (mixer 'mc') layer")
    if cfg.aggregation != "none":
        raise ValueError(f"post-training MC is for models trained without MC (aggregation 'none'), "
                         f"got aggregation {cfg.aggregation!r}")
    if aggregation not in POST_TRAINING:
        raise ValueError(f"post-training MC aggregation must be one of {list(POST_TRAINING)}, got {aggregation!r}")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.aggregation, new_cfg.init, new_cfg.segmentation = aggregation, "independent", "constant"
    new_cfg.segment_size = int(segment_size)
    new_cfg.online_weight = online_weight
    new_cfg.validate()
    new = MCForCausalLM(new_cfg)
    new.load_state_dict(model.state_dict(), strict=True)
    p = next(model.parameters())
    return new.to(device=p.device, dtype=p.dtype).eval()


# --- evaluation ----------------------------------------------------------------------------------------------


@torch.no_grad()
def measure(model, inputs: torch.Tensor, labels: torch.Tensor, buckets: int | list[int] = 8,
            batch_tokens: int = 16384, ar: bool = True) -> dict:
    """:class:`LMStats` of ``model`` on windows ``inputs, labels [N, T]``, in batches of ~``batch_tokens``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    T = inputs.shape[1]
    bs = max(1, batch_tokens // T)
    stats = LMStats(T, buckets)
    try:
        for i in range(0, inputs.shape[0], bs):
            x, y = inputs[i:i + bs], labels[i:i + bs]
            logits = model(input_ids=x.to(device), use_cache=False).logits
            nll = causal_lm_loss(logits, shift_labels=y, reduction="none")
            stats.add(nll.cpu(), y != IGNORE_INDEX, ar_hit_mask(x, y) if ar else None)
    finally:
        model.train(was_training)
    return stats.result()


def _tokens(cfg: Config, split: str) -> torch.Tensor:
    """The token stream ``[T]`` of one corpus split, tokenised as in training (documents joined by EOS)."""
    d = cfg.data
    tok = get_tokenizer(d.tokenizer, d.bpe_vocab_size)
    # seq_len is irrelevant here: only the token stream is kept and packed again per length
    return TextDataset(split, tok, d.seq_len, source=d.source).tokens


def evaluate(model, cfg: Config, spec: dict, variant: str) -> list[dict]:
    """The rows of one trained text run (see the module docstring)."""
    if cfg.data.task != "text":
        raise ValueError(f"the lm task needs a text run (data.task: text), got data.task {cfg.data.task!r}")
    L = cfg.data.seq_len
    split = spec.get("split", "valid")
    buckets = spec.get("position_buckets", 8)
    batch_tokens = int(spec.get("batch_tokens", 16384))
    tokens = _tokens(cfg, split)

    # 1-3: perplexity, loss by position and AR hits at the training length
    x, y = pack_causal(tokens, L)
    if spec.get("num_windows"):
        x, y = x[:int(spec["num_windows"])], y[:int(spec["num_windows"])]
    if x.shape[0] == 0:
        raise ValueError(f"the {split} split ({tokens.numel()} tokens) has no window of {L} tokens")
    r = measure(model, x, y, buckets, batch_tokens)
    rows = [{"metric": "ppl", "seq_len": L, "value": r["ppl"], "loss": r["loss"], "tokens": r["tokens"],
             "windows": x.shape[0]}]
    rows += [{"metric": "loss_by_position", "seq_len": L, **b} for b in r["loss_by_position"]]
    rows += [{"metric": "ar_hit_loss", "seq_len": L, "value": r["ar_hit_loss"], "tokens": r["ar_hit_tokens"]},
             {"metric": "other_loss", "seq_len": L, "value": r["other_loss"], "tokens": r["other_tokens"]},
             {"metric": "ar_hit_fraction", "seq_len": L, "value": r["ar_hit_fraction"], "tokens": r["tokens"]}]

    # 4: length extrapolation on the same tokens for every multiplier
    mults = sorted({int(m) for m in spec.get("length_multipliers", DEFAULT_MULTIPLIERS)})
    fits = [m for m in mults if (tokens.numel() - 1) // (m * L) >= 1]
    skipped = [m for m in mults if m not in fits]
    if skipped:
        print(f"[lm] {variant}: the {split} split ({tokens.numel()} tokens) has no window of {skipped} x {L} "
              f"tokens; skipped", flush=True)
    if not fits:
        return rows
    M = max(fits)
    W = min(int(spec.get("max_windows", 64)), (tokens.numel() - 1) // (M * L))
    span = tokens[:W * M * L + 1]
    models = [("as_trained", model)]
    post = post_training_modes(spec.get("post_training", ["mean"]))
    if _post_training_mc_applies(model):
        models += [(mode, with_post_training_mc(model, L, a, w)) for mode, a, w in post]
    for mode, m_model in models:
        for m in fits:
            xm, ym = pack_causal(span, m * L)
            rm = measure(m_model, xm, ym, buckets=1, batch_tokens=batch_tokens, ar=False)
            rows.append({"metric": "ppl_extrapolation", "seq_len": m * L, "multiplier": m, "mode": mode,
                         "value": rm["ppl"], "loss": rm["loss"], "tokens": rm["tokens"], "windows": xm.shape[0]})
    return rows


def _post_training_mc_applies(model) -> bool:
    # mcrnn's own models only; a transformers checkpoint (--model PATH) gets its no_mc / mc variants instead
    if not isinstance(model, MCForCausalLM):
        return False
    c = model.config
    return c.aggregation == "none" and "mc" in c.layer_mixers
