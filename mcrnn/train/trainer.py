"""The training loop (nanoGPT-sized): AdamW + warmup/cosine, clipping, accumulation, DDP, eval, checkpoints.

Run it with ``mcrnn train CONFIG.yaml`` or ``torchrun --nproc_per_node N -m mcrnn train CONFIG.yaml``; in
Python, ``train(load_config(path))``. What a run writes to ``train.out_dir``:

- ``config.yaml``: the checked config, overrides applied;
- ``metrics.jsonl``: one JSON object per line, ``{"step", "loss", "acc", "lr", "tokens_per_s", ...}`` for
  training and ``{"step", "eval_loss", "eval_acc"}`` for evals;
- ``ckpt.pt``: the latest checkpoint (model, optimizer, scheduler, RNG states, step), written atomically;
- ``pretrained/`` (runs with ``train.init_from`` only, at the end of the schedule): the trained model written
  with ``save_pretrained``, Memory Caching settings included; ``mcrnn.pretrained.from_pretrained`` loads it.

Resuming (``--resume``) restores all of it and continues from the saved step; the data are a function of
(seed, step) (:mod:`mcrnn.train.data`), so the resumed run computes bit-for-bit the losses of an
uninterrupted one (same device, same number of ranks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from mcrnn.data import IGNORE_INDEX
from mcrnn.data.packing import document_starts, packed_rows
from mcrnn.models import MCConfig, MCForCausalLM, causal_lm_loss

from .config import Config, TrainConfig
from .data import make_batches, shard

try:  # numpy is optional: nothing of ours draws from it, but its generator state is checkpointed if present
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
PRETRAINED_DIR = "pretrained"


# --- small pieces -----------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_model(model_cfg: dict, vocab_size: int):
    """``MCForCausalLM(MCConfig(**model_cfg))``, the vocabulary defaulting to the data's."""
    kw = dict(model_cfg)
    kw.setdefault("vocab_size", vocab_size)
    if kw["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size: {kw['vocab_size']} is smaller than the data's {vocab_size}")
    try:
        config = MCConfig(**kw)
    except (TypeError, ValueError) as e:  # name the section, keep MCConfig's message
        raise ValueError(f"model: {e}") from e
    return MCForCausalLM(config)


def build_pretrained(cfg: Config, vocab_size: int):
    """The ``train.init_from`` checkpoint, with the ``memory_caching`` settings added and ``train.freeze``
    applied (frozen parameters get ``requires_grad=False``, so :func:`make_optimizer` leaves them out).

    A new ``u_proj`` draws from torch's global generator: the trainer seeds it first, so a run and its resume
    build the same model. Raises a ValueError naming the field for a vocabulary too small for
    ``data.tokenizer`` or a ``freeze: backbone`` that leaves nothing to train.
    """
    from mcrnn.pretrained import freeze_backbone, memory_caching_settings
    from mcrnn.pretrained.loading import check_vocab, load_checkpoint_model
    from mcrnn.pretrained.settings import MCSettings

    from .config import _nothing_to_train

    t = cfg.train
    wanted = MCSettings.from_dict(cfg.memory_caching) if cfg.memory_caching is not None else None
    model = load_checkpoint_model(t.init_from, wanted)
    check_vocab(model, vocab_size, "data.tokenizer", cfg.data.tokenizer if cfg.data.task == "text" else "byte",
                t.init_from)
    if t.freeze == "backbone":
        settings = memory_caching_settings(model)
        if settings is None:
            raise ValueError(f"train.freeze: 'backbone' trains only Memory Caching parameters, but {t.init_from} "
                             "has no Memory Caching settings and the config adds none: add a memory_caching "
                             "section (e.g. aggregation: grm, segment_size: 2048)")
        if not freeze_backbone(model):
            raise ValueError(_nothing_to_train(settings.aggregation, settings.use_u))
    return model


def build_run_model(cfg: Config, vocab_size: int):
    """The model a run trains: an mcrnn model from the ``model`` section, or the ``train.init_from`` one."""
    if cfg.train.init_from is not None:
        return build_pretrained(cfg, vocab_size)
    return build_model(cfg.model, vocab_size)


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    # decay matrices (projections, embeddings) only; norms, biases and gate offsets keep their scale
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def forward_logits(model, x: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's logits for windows `x: [B, L]`; with `eos_id` (`data.separate_documents`) the windows' document
    pieces run as packed sequences (one row `[1, B·L]` and its `cu_seqlens`), so no token reads another document.
    Returns the logits and the flattening applied to the labels (None: unchanged)."""
    if eos_id is None:
        return model(input_ids=x, use_cache=False).logits, None
    row, _, cu_seqlens = packed_rows(x, x, document_starts(x, eos_id))
    return model(input_ids=row, cu_seqlens=cu_seqlens.to(x.device), use_cache=False).logits, row


@torch.no_grad()
def evaluate(model, inputs, labels, batch_size: int, device, amp, eos_id: int | None = None) -> dict:
    """Loss and accuracy over labelled positions (token-weighted)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        with amp:
            logits, packed = forward_logits(model, x, eos_id)
        if packed is not None:
            y = y.reshape(1, -1)
        mask = y != IGNORE_INDEX
        n = int(mask.sum())
        if n == 0:
            continue
        loss_sum += float(causal_lm_loss(logits, shift_labels=y)) * n
        correct += int(((logits.argmax(-1) == y) & mask).sum())
        total += n
    model.train(was_training)
    if total == 0:
        raise ValueError("eval set has no labelled position")
    return {"eval_loss": loss_sum / total, "eval_acc": correct / total}


# --- checkpoints ------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is None:
        return state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # a tensor, not an ndarray, so the checkpoint loads with torch.load(weights_only=True)
    state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and np is not None:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: a reader (or a crash)
    sees the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_finite(path, kind: str, tensors) -> None:
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"checkpoint {path}: {kind} {name!r} holds NaN or inf values; the run diverged "
                             f"before this checkpoint was written, resume from an earlier one")


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint and refuse one with non-finite model or optimizer values."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "step", "rng", "config"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path}: missing {key!r}; not an mcrnn training checkpoint")
    _check_finite(path, "model tensor", ckpt["model"].items())
    for pid, st in ckpt["optimizer"]["state"].items():
        _check_finite(path, "optimizer state", ((f"{pid}.{k}", v) for k, v in st.items()))
    return ckpt


# --- distributed ------------------------------------------------------------------------------------------


def _setup(t) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group under torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def _sum_across(x: float, world: int, device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


# --- the loop ---------------------------------------------------------------------------------------------


def _read_metrics(path: Path, upto: int) -> list[str]:
    """The lines of an earlier run's metrics up to and including step ``upto`` (what a resume keeps)."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= upto]


def train(cfg: Config, resume: bool | str | Path = False, stop_at: int | None = None) -> dict:
    """Train per ``cfg``; returns ``{"step", "params", "train_seconds", "eval_loss", "eval_acc", ...}``.

    Args:
        resume: ``True`` to continue from ``out_dir/ckpt.pt``, or a checkpoint path.
        stop_at: stop after this step (checkpointing it) as if the job were cut off there; a later
            ``resume=True`` run finishes the schedule of ``train.steps``.
    """
    t, d = cfg.train, cfg.data
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    rank, world, device = _setup(t)
    master = rank == 0
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size: {t.batch_size} must be a multiple of world size ({world}) x "
                         f"train.grad_accum ({t.grad_accum})")
    auto_dtype = torch.bfloat16 if device.type == "cuda" else None  # CPU: float32, no autocast
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16}.get(t.dtype, auto_dtype)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    out = Path(t.out_dir)
    ckpt_path = Path(resume) if isinstance(resume, (str, Path)) else out / CKPT_NAME
    ckpt = load_checkpoint(ckpt_path) if resume else None
    if ckpt is not None:
        have, want = ckpt["config"], cfg.to_dict()
        for sec in ("model", "data", "memory_caching"):
            if have.get(sec) != want.get(sec):
                raise ValueError(f"{sec}: differs from the checkpoint's ({ckpt_path}); resume with the same "
                                 f"{sec} section")
        for key in ("init_from", "freeze"):  # they decide which parameters exist and which the optimizer holds
            if have["train"].get(key, getattr(TrainConfig, key)) != want["train"][key]:
                raise ValueError(f"train.{key}: differs from the checkpoint's ({ckpt_path}); resume with the same "
                                 f"train.{key}")

    random.seed(t.seed)
    torch.manual_seed(t.seed)
    batches = make_batches(d, t.seed)
    # data.separate_documents: each window's document pieces run as packed sequences (cu_seqlens)
    eos_id = batches.eos_id if getattr(d, "separate_documents", False) else None
    model = build_run_model(cfg, batches.vocab_size).to(device)
    n_params = count_params(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = make_optimizer(model, t)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup, t.steps, t.min_lr_ratio))
    step, train_seconds = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        step, train_seconds = ckpt["step"], ckpt.get("train_seconds", 0.0)
    ddp = world > 1
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if ddp else model

    metrics_path = out / METRICS_NAME
    if master:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        kept = _read_metrics(metrics_path, step) if ckpt is not None else []
        with open(metrics_path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    log = open(metrics_path, "a", encoding="utf-8") if master else None

    def write(rec):
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    def checkpoint():
        if master:
            save_checkpoint(out / CKPT_NAME, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _rng_state(), "step": step, "train_seconds": train_seconds, "world_size": world,
                "config": cfg.to_dict()})
        if ddp:
            dist.barrier()

    eval_x, eval_y = batches.eval_set() if master else (None, None)

    def run_eval():
        res = evaluate(model, eval_x, eval_y, t.eval_batch_size, device, amp, eos_id) if master else {}
        if ddp:
            dist.barrier()  # the other ranks wait for rank 0's eval
        if master:
            write({"step": step, **res})
        return res

    bar = tqdm(total=t.steps, initial=step, disable=not (master and t.progress), dynamic_ncols=True,
               desc="train")
    last = stop_at if stop_at is not None else t.steps
    tokens_per_step = t.batch_size * d.seq_len
    win_loss = win_acc = 0.0
    win_n, win_t = 0, 0.0
    res: dict = {}
    net.train()
    while step < min(last, t.steps):
        t0 = time.perf_counter()
        batch = batches.global_batch(step, t.batch_size)
        # the loss is the mean over the labelled tokens of the whole global batch (every rank knows their
        # number), whatever the split into ranks and micro-batches: each micro-batch contributes its sum
        n_labels = max(int((batch[1] != IGNORE_INDEX).sum()), 1)
        micro = shard(batch, rank, world, t.grad_accum)
        step_loss = step_correct = 0.0
        for i, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # accumulate locally; DDP all-reduces the gradients on the last micro-batch only
            sync = contextlib.nullcontext() if (not ddp or i == len(micro) - 1) else net.no_sync()
            with sync:
                with amp:
                    logits, packed = forward_logits(net, x, eos_id)
                if packed is not None:
                    y = y.reshape(1, -1)
                loss_sum = causal_lm_loss(logits, shift_labels=y, reduction="sum")
                # DDP averages the gradients over ranks, hence the factor `world`
                (loss_sum * (world / n_labels)).backward()
            step_loss += loss_sum.item() / n_labels  # this rank's share of the global mean
            step_correct += int(((logits.detach().argmax(-1) == y) & (y != IGNORE_INDEX)).sum())
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; lower train.lr or set "
                                     f"train.grad_clip")
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        train_seconds += dt
        win_loss += step_loss
        win_acc += step_correct / n_labels
        win_n, win_t = win_n + 1, win_t + dt

        if step % t.log_every == 0 or step == t.steps:
            loss_avg = _sum_across(win_loss, world, device) / win_n
            acc_avg = _sum_across(win_acc, world, device) / win_n
            tps = win_n * tokens_per_step / max(win_t, 1e-9)
            write({"step": step, "loss": loss_avg, "acc": acc_avg, "lr": lr, "tokens_per_s": tps,
                   "train_seconds": train_seconds})
            bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.3f}", tok_s=f"{tps:,.0f}")
            win_loss = win_acc = 0.0
            win_n, win_t = 0, 0.0
        bar.update(1)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            res = run_eval()
        if (t.ckpt_every and step % t.ckpt_every == 0) or step in (last, t.steps):
            checkpoint()
    bar.close()
    if step >= t.steps:
        res = run_eval()
        if t.init_from is not None and master:
            model.save_pretrained(out / PRETRAINED_DIR)
    if log is not None:
        log.close()
    return {"step": step, "params": n_params, "trainable_params": n_trainable, "train_seconds": train_seconds,
            **res}


def cleanup() -> None:
    """Tear down the process group that :func:`train` started under torchrun."""
    if dist.is_initialized():
        dist.destroy_process_group()
