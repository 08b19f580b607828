"""The training config: three YAML sections (``model``, ``data``, ``train``), checked before anything runs.

``model`` holds :class:`mcrnn.models.MCConfig` keyword arguments; ``data`` and ``train`` are the
dataclasses below. A run that starts from a pretrained transformers checkpoint (``train.init_from``) takes its
architecture from there: its ``model`` section stays empty and an optional fourth section, ``memory_caching``,
holds the Memory Caching settings to add (:class:`mcrnn.pretrained.MCSettings`; see docs/pretrained.md).

Every check raises ``ValueError`` naming the offending field (``train.lr`` …), so a bad config fails in
milliseconds instead of after the first eval.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("mqar", "mqar_spread", "text", "niah")


def _spec(default, *, choices=None, lo=None, hi=None, lo_open=False, doc=""):
    """A dataclass field with its allowed values in the metadata (``lo``/``hi`` inclusive unless open)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    task: str = _spec("mqar_spread", choices=TASKS, doc="mqar | mqar_spread | text | niah")
    seq_len: int = _spec(256, lo=2, doc="tokens per example")
    # MQAR
    vocab_size: int = _spec(8192, lo=4, doc="MQAR vocabulary (keys in the lower half, values the upper)")
    num_kv_pairs: int | list[int] = _spec(16, lo=1, doc="MQAR pairs per example; a list mixes difficulties")
    eval_num_kv_pairs: int | None = _spec(None, lo=1, doc="MQAR pairs of the eval set (None: the largest)")
    power_a: float | None = _spec(None, lo=0.0, lo_open=True, doc="query-gap power law (None: task default)")
    random_non_queries: bool = _spec(True, doc="MQAR filler: random tokens instead of 0")
    num_eval: int = _spec(1000, lo=1, doc="held-out examples for eval (text: first windows of valid)")
    # text (and the haystacks of niah)
    source: str = _spec("sample", choices=("sample", "gutenberg"), doc="text corpus")
    tokenizer: str = _spec("byte", choices=("byte", "bpe"), doc="text tokenizer")
    bpe_vocab_size: int = _spec(8192, lo=257, doc="vocabulary of the cached corpus BPE")
    # niah (byte level)
    niah_variants: int | list[int] = _spec([1, 2, 3], choices=(1, 2, 3),
                                           doc="S-NIAH variants mixed in training (1 filler, 2 text, 3 uuid)")
    separate_documents: bool = _spec(False, doc="text: each document piece of a window is a sequence of its own "
                                              "(packed, cu_seqlens), so no token reads another document")
    niah_label: str = _spec("query", choices=("query", "answer"),
                            doc="S-NIAH bytes labelled in training: query and answer, or the answer only")
    niah_keys: str = _spec("words", choices=("words", "random"),
                           doc="S-NIAH needle keys: word keys (held-out words for eval) or a fresh random key "
                               "per example (copying is the only way to predict them)")


@dataclass
class TrainConfig:
    steps: int = _spec(1000, lo=1, doc="optimizer steps")
    batch_size: int = _spec(32, lo=1, doc="global batch (sequences per optimizer step, all ranks)")
    grad_accum: int = _spec(1, lo=1, doc="micro-batches per optimizer step and rank")
    lr: float = _spec(1e-3, lo=0.0, lo_open=True, doc="peak learning rate")
    min_lr_ratio: float = _spec(0.1, lo=0.0, hi=1.0, doc="final lr / peak lr of the cosine")
    warmup: int = _spec(100, lo=0, doc="linear warmup steps")
    weight_decay: float = _spec(0.1, lo=0.0, doc="AdamW decay (matrices only)")
    beta1: float = _spec(0.9, lo=0.0, hi=1.0)
    beta2: float = _spec(0.99, lo=0.0, hi=1.0)
    grad_clip: float = _spec(1.0, lo=0.0, doc="max gradient norm; 0 disables clipping")
    eval_every: int = _spec(0, lo=0, doc="eval period in steps; 0: only at the end")
    eval_batch_size: int = _spec(64, lo=1)
    log_every: int = _spec(10, lo=1, doc="train metrics period in steps")
    ckpt_every: int = _spec(0, lo=0, doc="checkpoint period in steps; 0: only at the end")
    seed: int = _spec(0, lo=0, doc="model init and data")
    out_dir: str = _spec("results/run", doc="metrics.jsonl, ckpt.pt, config.yaml")
    device: str = _spec("auto", choices=("auto", "cpu", "cuda"))
    dtype: str = _spec("auto", choices=("auto", "float32", "bfloat16"), doc="auto: bf16 on GPU")
    threads: int | None = _spec(None, lo=1, doc="torch.set_num_threads (None: leave as is)")
    progress: bool = _spec(True, doc="tqdm progress bar")
    init_from: str | None = _spec(None, doc="a transformers checkpoint directory (save_pretrained) to start from")
    freeze: str = _spec("none", choices=("none", "backbone"),
                        doc="backbone: train only the Memory Caching parameters (u_proj) of an init_from model")


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: the Memory Caching settings added to a `train.init_from` checkpoint (None: none added)
    memory_caching: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": copy.deepcopy(self.model), "data": dataclasses.asdict(self.data),
               "train": dataclasses.asdict(self.train)}
        if self.memory_caching is not None:
            out["memory_caching"] = copy.deepcopy(self.memory_caching)
        return out


# --- checking ----------------------------------------------------------------------------------------------


def _allowed_types(tp) -> tuple[type, ...]:
    if isinstance(tp, str):  # `from __future__ import annotations` leaves strings; resolve them
        tp = eval(tp, {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "Any": Any})
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(tp) for t in _allowed_types(a))
    if tp is None or tp is type(None):
        return (type(None),)
    return (typing.get_origin(tp) or tp,)


def _coerce(name: str, value, allowed: tuple[type, ...]):
    """``value`` as one of ``allowed``, or a ValueError naming ``name``.

    Ints are accepted for float fields, and so are strings such as ``"1e-3"`` (YAML 1.1, which PyYAML
    implements, reads ``1e-3`` as a string). A bool is never taken for a number.
    """
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and float in allowed and str not in allowed:
        try:
            return float(value)
        except ValueError:
            pass
    elif value is None and type(None) in allowed:
        return None
    elif isinstance(value, list) and list in allowed and value:
        return [_coerce(f"{name}[{i}]", v, (int,)) for i, v in enumerate(value)]
    elif isinstance(value, str) and str in allowed:
        return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"{name}: expected {names}, got {type(value).__name__} {value!r}")


def _check_range(name: str, value, meta: dict) -> None:
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(f"{name}[{i}]", v, meta)
        return
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"{name}: must be one of {list(meta['choices'])}, got {value!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
        raise ValueError(f"{name}: must be {'>' if meta['lo_open'] else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {value!r}")


def _build_section(cls, section: str, raw) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{section}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in raw.items():
        name = f"{section}.{key}"
        value = _coerce(name, value, _allowed_types(hints[key]))
        _check_range(name, value, fields[key].metadata)
        kw[key] = value
    return cls(**kw)


def _model_fields() -> dict[str, Any]:
    """MCConfig's own keyword arguments and their defaults (HF's generic kwargs are not accepted)."""
    from mcrnn.models import MCConfig

    sig = inspect.signature(MCConfig.__init__)
    return {n: p.default for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _check_model(raw) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"model: expected a mapping, got {type(raw).__name__}")
    known = _model_fields()
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"model.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    out = {}
    for key, value in raw.items():
        default, name = known[key], f"model.{key}"
        # scalar defaults give the expected type; lists are allowed where a str/int default exists
        # (per-layer mixers and memories), MCConfig checks their items
        if isinstance(default, bool):
            value = _coerce(name, value, (bool,))
        elif isinstance(default, int) and not isinstance(value, list):
            value = _coerce(name, value, (int,))
        elif isinstance(default, float):
            value = _coerce(name, value, (float,))
        elif isinstance(default, str) and not isinstance(value, (str, list)):
            raise ValueError(f"{name}: expected str, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def validate(raw: dict) -> Config:
    """A :class:`Config` from a plain dict (a parsed YAML), or a ValueError naming the bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a mapping (model/data/train), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(SECTIONS))})")
    data = _build_section(DataConfig, "data", raw.get("data"))
    train = _build_section(TrainConfig, "train", raw.get("train"))
    if train.init_from is not None:
        model, mc = _check_pretrained(raw.get("model"), raw.get("memory_caching"), train)
    else:
        if raw.get("memory_caching") is not None:
            raise ValueError("memory_caching: only read with train.init_from (a pretrained transformers "
                             "checkpoint); mcrnn's own models take their MC settings in the model section")
        if train.freeze != "none":
            raise ValueError(f"train.freeze: {train.freeze!r} needs train.init_from (a pretrained transformers "
                             "checkpoint whose backbone stays frozen); use freeze: none for mcrnn's own models")
        model, mc = _check_model(raw.get("model")), None
    cfg = Config(model=model, data=data, train=train, memory_caching=mc)
    _check_cross(cfg)
    return cfg


SECTIONS = ("model", "data", "train", "memory_caching")


def _check_pretrained(model_raw, mc_raw, t: TrainConfig) -> tuple[dict, dict | None]:
    """The (empty) model section and the checked ``memory_caching`` section of a ``train.init_from`` run."""
    if model_raw:
        if not isinstance(model_raw, dict):
            raise ValueError(f"model: expected a mapping, got {type(model_raw).__name__}")
        key = sorted(model_raw)[0]
        raise ValueError(f"model.{key}: a train.init_from run takes its architecture from the checkpoint; leave "
                         "the model section empty (Memory Caching settings go in the memory_caching section)")
    if not t.init_from:
        raise ValueError("train.init_from: expected a checkpoint directory, got an empty string")
    from pathlib import Path

    if not (Path(t.init_from) / "config.json").is_file():
        raise ValueError(f"train.init_from: {t.init_from!r} is not a directory written by save_pretrained "
                         "(no config.json)")
    mc = None
    if mc_raw is not None:
        from mcrnn.pretrained.loading import settings_from

        settings = settings_from(mc_raw, "memory_caching")
        mc = settings.to_dict()
        if t.freeze == "backbone" and not settings.has_u_proj:
            raise ValueError(_nothing_to_train(settings.aggregation, settings.use_u))
    return {}, mc


def _nothing_to_train(aggregation: str, use_u: bool) -> str:
    why = (f"aggregation {aggregation!r} has no parameters" if aggregation not in ("grm", "soup", "ssc")
           else f"aggregation {aggregation!r} with use_u: false scores with u = q and adds no parameters")
    return (f"train.freeze: 'backbone' leaves nothing to train: {why}, so there is nothing to post-train. "
            "Evaluate it directly (mcrnn eval lm --model PATH --mc.aggregation=...), or choose a scored "
            "aggregation (grm, soup, ssc) with use_u: true")


def niah_variants(d: DataConfig) -> list[int]:
    return [d.niah_variants] if isinstance(d.niah_variants, int) else list(d.niah_variants)


def kv_pairs(d: DataConfig) -> list[int]:
    return [d.num_kv_pairs] if isinstance(d.num_kv_pairs, int) else list(d.num_kv_pairs)


def _check_cross(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if t.warmup > t.steps:
        raise ValueError(f"train.warmup: must be <= train.steps ({t.steps}), got {t.warmup}")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size: {t.batch_size} is not a multiple of train.grad_accum "
                         f"{t.grad_accum}")
    if d.task.startswith("mqar"):
        ns = kv_pairs(d)
        n = max(ns + [d.eval_num_kv_pairs or 0])
        if d.seq_len % 2 or 4 * n > d.seq_len:
            raise ValueError(f"data.num_kv_pairs: MQAR needs an even seq_len >= 4 * num_kv_pairs, "
                             f"got seq_len={d.seq_len}, num_kv_pairs={n}")
        if d.vocab_size < 2 * n + 2:
            raise ValueError(f"data.vocab_size: must be >= 2 * num_kv_pairs + 2 = {2 * n + 2}, "
                             f"got {d.vocab_size}")
        if t.batch_size % len(ns):
            raise ValueError(f"train.batch_size: {t.batch_size} is not a multiple of the {len(ns)} values of "
                             f"data.num_kv_pairs")
        vs = cfg.model.get("vocab_size")  # a train.init_from model's vocabulary is checked once it is loaded
        if vs is not None and vs < d.vocab_size:
            raise ValueError(f"model.vocab_size: {vs} is smaller than data.vocab_size {d.vocab_size}")
    if d.separate_documents:
        if d.task != "text":
            raise ValueError(f"data.separate_documents: only text has documents, got data.task={d.task!r}")
        mixers = cfg.model.get("mixer", "mc")
        if "attention" in ([mixers] if isinstance(mixers, str) else list(mixers)) or t.init_from:
            raise ValueError("data.separate_documents: packed sequences (cu_seqlens) need Memory Caching layers "
                             "only (no attention layers, no train.init_from model)")
    if d.task == "niah":
        from mcrnn.data.niah import min_seq_len

        vs = niah_variants(d)
        need = max(min_seq_len(v) for v in vs)
        if d.seq_len + 1 < need:
            raise ValueError(f"data.seq_len: S-NIAH variants {vs} need seq_len >= {need - 1} (needle, query and "
                             f"answer), got {d.seq_len}")
        if d.tokenizer != "byte":
            raise ValueError(f"data.tokenizer: niah is byte level, got {d.tokenizer!r}")


# --- loading -----------------------------------------------------------------------------------------------


def split_overrides(args: list[str], form: str = "--section.key=value") -> list[tuple[str, list[str], object]]:
    """``["--a.b=1", "--c", "[2]"]`` → ``[("--a.b=1", ["a", "b"], 1), ("--c", ["c"], [2])]``: each override's
    text, its dotted path and its value read as YAML (``true``, ``[1, 2]``, ``null``; empty text stays ``""``).
    ``form`` names the expected syntax in errors."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"override {arg!r}: expected {form}")
        if "=" in arg:
            path, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r}: missing value")
            path, text = arg[2:], args[i + 1]
            i += 2
        out.append((arg, path.split("."), yaml.safe_load(text) if text != "" else ""))
    return out


def parse_overrides(args: list[str]) -> dict:
    """``["--train.lr=3e-4", "--model.top_k", "2"]`` → ``{"train": {"lr": "3e-4"}, "model": {"top_k": 2}}``.

    Values are read as YAML (``true``, ``[1, 2]``, ``null``); the dotted path must be ``section.key``.
    """
    out: dict = {}
    for arg, parts, value in split_overrides(args):
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"override {arg!r}: expected --section.key=value")
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` applied section by section (a new dict)."""
    out = copy.deepcopy(base) if base else {}
    for sec, kv in over.items():
        if isinstance(kv, dict) and isinstance(out.get(sec), dict):
            out[sec].update(copy.deepcopy(kv))
        else:
            out[sec] = copy.deepcopy(kv)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config, apply ``--section.key=value`` overrides (or a nested dict) and check it."""
    raw = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with sections model/data/train")
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = merge(raw, over)
    return validate(raw)
