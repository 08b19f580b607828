"""``mcrnn report``: the results JSON of ``mcrnn eval`` -> ``docs/results.md`` (tables, plots, paper claims).

    mcrnn report [RESULTS_DIR ...] [--collect DIR] [--out docs/results.md] [--quick] [--claims ...]

Every ``RESULTS_DIR`` (default ``docs/results``, the results committed with the report) is searched for
``<experiment>/full/results.json`` (``--quick``: ``<experiment>/quick/results.json``). ``--collect DIR`` first
copies the finished experiments of ``DIR`` (e.g. ``results/eval``, where ``mcrnn eval`` writes) into
``docs/results/<experiment>/full/``, replacing what was there: commit those small files with the report, and
``mcrnn report`` on a fresh clone rebuilds ``docs/results.md`` exactly from them. Each section of the report
is built from the experiment it names (``mqar``, ``mqar_deep``, ``mqar_width``, ``ablations``, ``niah``,
``lm``, ``throughput``) and says which command, experiment file, commit and machine produced its numbers; a
missing experiment leaves its section and its claims' checks "not measured". The paper's claims, and the
experiments, variants, metric and comparison that measure each, are declared in ``--claims`` (see
:func:`load_claims`); this module evaluates them with the verdict rules of :func:`contrast`. Figures go to
``<out stem>/`` next to the markdown file.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from .common import mean_se, mean_std, state_counts

NOT_MEASURED = "not measured"
#: where the results the committed report is built from live (small JSON files, committed with it)
COMMITTED = "docs/results"


# --- loading -----------------------------------------------------------------------------------------------


def load_results(roots: list[str | Path], quick: bool = False) -> dict[str, dict]:
    """``{experiment: results}`` from ``ROOT/<experiment>/<full|quick>/results.json`` (or ``ROOT/results.json``
    directly under an experiment directory)."""
    kind = "quick" if quick else "full"
    found: dict[str, dict] = {}
    for root in roots:
        root = Path(root)
        for path in sorted(root.glob(f"*/{kind}/results.json")) + sorted(root.glob(f"{kind}/results.json")):
            name = path.parent.parent.name
            with open(path, encoding="utf-8") as f:
                found[name] = json.load(f)
    return found


def collect(src: str | Path, dst: str | Path = COMMITTED) -> list[str]:
    """Copy ``src/<experiment>/full/results.json`` to ``dst/<experiment>/full/results.json`` (atomically, one
    file each); returns the experiments copied."""
    from .common import write_json

    done = []
    for path in sorted(Path(src).glob("*/full/results.json")):
        name = path.parent.parent.name
        with open(path, encoding="utf-8") as f:
            write_json(Path(dst) / name / "full" / "results.json", json.load(f))
        done.append(name)
    return done


def mqar_cells(res: dict) -> dict[str, dict[tuple[int, int], list[float]]]:
    """``{variant: {(seq_len, num_kv_pairs): [accuracy per seed]}}``."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for run in res["runs"]:
        for row in run["rows"]:
            out[run["variant"]][(row["seq_len"], row["num_kv_pairs"])].append(row["accuracy"])
    return {v: dict(c) for v, c in out.items()}


def run_info(res: dict) -> dict[str, dict]:
    """``{variant: first run record}`` (params, state floats, model, training seconds)."""
    info: dict = {}
    for run in res["runs"]:
        info.setdefault(run["variant"], run)
    return info


def _mean(xs) -> float:
    return mean_std(list(xs))[0]


# --- rendering helpers -----------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def pm(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.3f}" if len(xs) == 1 else f"{m:.3f} ± {s:.3f}"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(res: dict) -> str:
    m = res.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    return (f"*Produced by* `{res.get('command', '?')}` *(experiment file `{res.get('experiment', '?')}`, commit "
            f"`{res.get('commit', '?')}`, {where}, torch {m.get('torch', '?')}, {res.get('jobs', 1)} job(s) x "
            f"{res.get('threads', '?')} thread(s), {res.get('wall_seconds', 0) / 60:.1f} min, finished "
            f"{res.get('finished', '?')}).*" + tuning_note(res))


def tuning_note(res: dict) -> str:
    """How each variant's learning rate was chosen, when the experiment tuned it (``tune``), else ''."""
    tuned, tune = res.get("tuned"), res.get("tune")
    if not tuned or not tune:
        return ""
    picks = ", ".join(f"`{v}` {rec['lr']:g}" for v, rec in tuned.items())
    cands = ", ".join(f"{x:g}" for x in tune["lr"])
    better = "lowest" if tune["metric"] == "eval_loss" else "highest"
    return (f" Learning rates tuned per variant over {{{cands}}} by the {better} final held-out "
            f"`{tune['metric']}` of one run at seed {tune['seed']} (not a reported seed): {picks}.")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- MQAR ------------------------------------------------------------------------------------------------


def run_state(run: dict) -> dict[str, int]:
    """``{"memory", "summaries", "kv"}`` floats of a run at its training length: as recorded, else computed
    from its model config (results written before the split recorded only the total)."""
    if "state" in run:
        return run["state"]
    try:
        return state_counts(run["model"], run["train_seq_len"])
    except (KeyError, TypeError, ValueError):
        return {"memory": run.get("state_floats", 0), "summaries": 0, "kv": 0}


def _state_cells(state: dict[str, int]) -> list[str]:
    memory = [f"{state['memory']:,}"] if state.get("memory") else []
    memory += [f"{state['kv']:,} (KV cache)"] if state.get("kv") else []
    return [" + ".join(memory) or "0", f"{state['summaries']:,}" if state.get("summaries") else "–"]


def mqar_reference_levels(res: dict) -> dict[tuple[int, int], dict[str, float]]:
    """``{(seq_len, num_kv_pairs): {"chance", "guess_among_values"}}``: as the rows record them, else from the
    experiment's data settings (:func:`mcrnn.eval.mqar.chance_levels`)."""
    from .mqar import chance_levels

    out: dict = {}
    vocab = (((res.get("config") or {}).get("base") or {}).get("data") or {}).get("vocab_size")
    for run in res["runs"]:
        for row in run["rows"]:
            key = (row["seq_len"], row["num_kv_pairs"])
            if "chance" in row:
                out.setdefault(key, {"chance": row["chance"], "guess_among_values": row["guess_among_values"]})
            elif vocab:
                out.setdefault(key, chance_levels(vocab, row["num_kv_pairs"]))
    return out


def divergence_rates(res: dict) -> dict[str, dict[tuple[int, int], float]]:
    """``{variant: {(seq_len, num_kv_pairs): fraction of examples that diverged, over seeds}}``; a row of an
    older result that only says ``diverged`` scored its whole cell 0: rate 1."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for run in res["runs"]:
        for row in run["rows"]:
            rate = row.get("divergence_rate", 1.0 if row.get("diverged") else 0.0)
            out[run["variant"]][(row["seq_len"], row["num_kv_pairs"])].append(rate)
    return {v: {k: _mean(r) for k, r in c.items()} for v, c in out.items()}


def mqar_table(res: dict) -> str:
    """Accuracy per variant and cell (mean ± std over seeds), the state each variant keeps at its training
    length (memories and summaries separately), and the two guessers' levels per cell."""
    cells = mqar_cells(res)
    info = run_info(res)
    keys = sorted({k for c in cells.values() for k in c})
    head = ["variant", "params", "state @ train len: memory", "summaries"] + [f"L={L}, n={n}" for L, n in keys]
    rows = []
    for v in cells:
        rows.append([f"`{v}`", f"{info[v]['params']:,}", *_state_cells(run_state(info[v]))]
                    + [pm(cells[v][k]) if k in cells[v] else "–" for k in keys])
    levels = mqar_reference_levels(res)
    if levels:
        some = next(iter(levels.values()))
        rows.append([f"*chance (1/{round(1 / some['chance'])} value tokens)*", "", "", ""]
                    + [fmt(levels.get(k, {}).get("chance")) for k in keys])
        rows.append(["*guess among the n values (1/n)*", "", "", ""]
                     + [fmt(levels.get(k, {}).get("guess_among_values")) for k in keys])
    return md_table(head, rows)


def divergence_table(res: dict) -> str | None:
    """The fraction of examples whose output was not finite (scored wrong), per variant and cell, mean over
    seeds; ``None`` when no example diverged."""
    rates = divergence_rates(res)
    if not any(r for c in rates.values() for r in c.values()):
        return None
    keys = sorted({k for c in rates.values() for k in c})
    return md_table(["variant"] + [f"L={L}, n={n}" for L, n in keys],
                    [[f"`{v}`"] + [fmt(c.get(k)) for k in keys] for v, c in rates.items() if any(c.values())])


def mqar_plot(res: dict, path: Path, title: str) -> Path:
    plt = _plt()
    cells = mqar_cells(res)
    lens = sorted({L for c in cells.values() for L, _ in c})
    fig, axes = plt.subplots(1, len(lens), figsize=(4.2 * len(lens), 3.6), squeeze=False)
    for ax, L in zip(axes[0], lens, strict=True):
        for v, c in cells.items():
            pts = sorted((n, mean_std(a)) for (LL, n), a in c.items() if LL == L)
            if not pts:
                continue
            ns = [p[0] for p in pts]
            ms = [p[1][0] for p in pts]
            ss = [p[1][1] for p in pts]
            ax.errorbar(ns, ms, yerr=ss, marker="o", capsize=2, label=v)
        ax.set_title(f"{title}: length {L}")
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def state_plot(res_list: list[dict], path: Path) -> Path:
    """Accuracy at the training length and its largest pair count vs the state floats a model keeps."""
    from .common import state_floats

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for res in res_list:
        cells, info = mqar_cells(res), run_info(res)
        for v, c in cells.items():
            L = info[v]["train_seq_len"]
            ks = [k for k in c if k[0] == L]
            if not ks:
                continue
            n = max(k[1] for k in ks)
            s = state_floats(info[v]["model"], L)
            ax.scatter([s], [_mean(c[(L, n)])], label=f"{v} (n={n})")
            ax.annotate(v, (s, _mean(c[(L, n)])), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("state floats at the end of the sequence (all layers)")
    ax.set_ylabel("accuracy")
    ax.set_title("MQAR accuracy vs state size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def capacity_state(res: dict) -> dict[str, dict[int, int]]:
    """``{variant: {seq_len: floats held after seq_len tokens}}`` for every evaluated length: a fixed state
    stays flat, attention's KV cache and Memory Caching's cache grow with the length."""
    from .common import state_floats

    info = run_info(res)
    lens = sorted({L for c in mqar_cells(res).values() for L, _ in c})
    return {v: {L: state_floats(info[v]["model"], L) for L in lens} for v in info}


def capacity_table(res: dict) -> str:
    """Floats each variant holds at each evaluated length, next to the most key-value pairs measured there."""
    state = capacity_state(res)
    pairs: dict = defaultdict(set)
    for c in mqar_cells(res).values():
        for L, n in c:
            pairs[L].add(n)
    lens = sorted(pairs)
    head = ["variant"] + [f"L={L} (n≤{max(pairs[L])})" for L in lens]
    return md_table(head, [[f"`{v}`"] + [f"{s[L]:,}" for L in lens] for v, s in state.items()])


def frontier_plot(res: dict, path: Path) -> Path:
    """Zoology's recall-vs-state frontier, one panel per evaluated length at its largest pair count: accuracy
    (mean ± std over seeds) against the floats each model holds at the end of a sequence of that length."""
    plt = _plt()
    cells, state = mqar_cells(res), capacity_state(res)
    hardest = {}
    for c in cells.values():
        for L, n in c:
            hardest[L] = max(hardest.get(L, 0), n)
    lens = sorted(hardest)
    fig, axes = plt.subplots(1, len(lens), figsize=(3.6 * len(lens), 3.6), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lens, strict=True):
        for i, v in enumerate(cells):
            if (L, hardest[L]) not in cells[v]:
                continue
            m, sd = mean_std(cells[v][(L, hardest[L])])
            ax.errorbar([state[v][L]], [m], yerr=[sd], marker="os^vD<>ph*"[i % 10], capsize=2, color=f"C{i % 10}",
                        label=v, linestyle="none")
        ax.set_xscale("log")
        ax.set_title(f"L={L}, n={hardest[L]} pairs")
        ax.set_xlabel("floats held at the end")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- NIAH, LM, throughput ----------------------------------------------------------------------------------


def niah_summary(res: dict, metric: str = "accuracy") -> dict[str, dict[tuple[int, int], float]]:
    """``{variant: {(niah, multiplier): metric averaged over depths and seeds}}`` (``accuracy``: exact match,
    ``byte_accuracy``: the fraction of answer bytes right, ``teacher_forced_accuracy``: the same when the model
    reads the true answer so far)."""
    return {v: {k: _mean(xs) for k, xs in c.items()} for v, c in niah_seeds(res, metric).items()}


def niah_seeds(res: dict, metric: str = "accuracy") -> dict[str, dict[tuple[int, int], list[float]]]:
    """``{variant: {(niah, multiplier): [metric averaged over depths, one per seed]}}``."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run in res["runs"]:
        for row in run["rows"]:
            if metric in row:
                acc[run["variant"]][(row["niah"], row["length_multiplier"])][run.get("seed", 0)].append(row[metric])
    return {v: {k: [_mean(xs) for xs in per_seed.values()] for k, per_seed in c.items()} for v, c in acc.items()}


def niah_chance(niah: int, metric: str = "accuracy") -> float:
    """What a guesser that knows the answer's format but not the needle scores (mcrnn.data.niah's formats):
    S-NIAH-1/2 a 7-digit number without a leading zero, S-NIAH-3 a version-4 UUID (36 bytes: 30 random hex
    digits, one of 4 variant digits, the fixed version digit and 4 dashes). Byte accuracies, generated or
    teacher-forced, have the same chance level."""
    if niah == 3:
        return (30 / 16 + 1 / 4 + 5) / 36 if metric != "accuracy" else 16.0 ** -30 / 4
    return (1 / 9 + 6 / 10) / 7 if metric != "accuracy" else 1 / (9 * 10 ** 6)


def niah_table(res: dict, metric: str = "accuracy") -> str:
    s = niah_seeds(res, metric)
    keys = sorted({k for c in s.values() for k in c})
    L = run_info(res)[next(iter(s))]["train_seq_len"] if s else 0
    what = {"accuracy": "exact match", "byte_accuracy": "byte accuracy",
            "teacher_forced_accuracy": "teacher-forced byte accuracy"}.get(metric, metric)
    head = [f"variant ({what})"] + [f"S-NIAH-{t} @{m}x ({m * L})" for t, m in keys]
    rows = [[f"`{v}`"] + [pm(c[k]) if k in c else "–" for k in keys] for v, c in s.items()]
    rows.append(["*chance (a guess in the answer's format)*"] + [fmt(niah_chance(t, metric)) for t, _ in keys])
    return md_table(head, rows)


def niah_plot(res: dict, path: Path) -> Path:
    plt = _plt()
    s = niah_summary(res)
    kinds = sorted({t for c in s.values() for t, _ in c})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, t in zip(axes[0], kinds, strict=True):
        for v, c in s.items():
            pts = sorted((m, a) for (tt, m), a in c.items() if tt == t)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_title(f"S-NIAH-{t}")
        ax.set_xlabel("length / training length")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lm_rows(res: dict, metric: str) -> dict[str, list[dict]]:
    out: dict = defaultdict(list)
    for run in res["runs"]:
        out[run["variant"]].extend(r for r in run["rows"] if r["metric"] == metric)
    return dict(out)


def lm_table(res: dict) -> str:
    head = ["variant", "params", "perplexity @ L", "loss on AR hits", "loss on other tokens", "AR-hit fraction",
            "loss first 1/8 → last 1/8"]
    info = run_info(res)
    rows = []
    def one(metric, v):
        rs = lm_rows(res, metric).get(v, [])
        return _mean(r["value"] for r in rs) if rs else None

    for v in info:
        buckets: dict = defaultdict(list)  # bucket -> its value per seed
        for r in lm_rows(res, "loss_by_position").get(v, []):
            buckets[r["bucket_start"]].append(r["value"])
        pos = [_mean(buckets[b]) for b in sorted(buckets)]
        trend = f"{pos[0]:.3f} → {pos[-1]:.3f}" if pos else "–"
        rows.append([f"`{v}`", f"{info[v]['params']:,}", fmt(one("ppl", v), 2), fmt(one("ar_hit_loss", v)),
                     fmt(one("other_loss", v)), fmt(one("ar_hit_fraction", v)), trend])
    return md_table(head, rows)


def extrapolation(res: dict) -> dict[tuple[str, str], dict[int, float]]:
    """``{(variant, mode): {multiplier: perplexity, mean over seeds}}``."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for v, rs in lm_rows(res, "ppl_extrapolation").items():
        for r in rs:
            out[(v, r["mode"])][r["multiplier"]].append(r["value"])
    return {k: {m: _mean(xs) for m, xs in c.items()} for k, c in out.items()}


def extrapolation_table(res: dict) -> str:
    ex = extrapolation(res)
    ms = sorted({m for c in ex.values() for m in c})
    L = next(iter(run_info(res).values()))["train_seq_len"] if ex else 0
    head = ["variant", "mode"] + [f"{m}x ({m * L})" for m in ms]
    return md_table(head, [[f"`{v}`", mode] + [fmt(c.get(m), 2) for m in ms] for (v, mode), c in ex.items()])


def extrapolation_plot(res: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (v, mode), c in extrapolation(res).items():
        ms = sorted(c)
        ax.plot(ms, [c[m] for m in ms], marker="o", linestyle="-" if mode == "as_trained" else "--",
                label=f"{v} ({mode})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("length / training length")
    ax.set_ylabel("perplexity (bytes)")
    ax.set_title("length extrapolation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def throughput_rows(res: dict) -> list[dict]:
    if "rows" in res:
        return res["rows"]
    return [r for run in res.get("runs", []) for r in run.get("rows", [])]


def throughput_table(res: dict) -> str:
    rows = [r for r in throughput_rows(res) if not r.get("skipped")]
    lens = sorted({r["seq_len"] for r in rows})
    by = defaultdict(dict)
    for r in rows:
        by[r["variant"]][r["seq_len"]] = r
    head = ["variant"] + [f"train tok/s @{L}" for L in lens] + [f"decode tok/s @{L}" for L in lens] + [
        f"peak MB @{lens[-1]}" if lens else "peak MB"]
    out = []
    for v, c in by.items():
        out.append([f"`{v}`"] + [f"{c[L]['train_tokens_per_s']:,.0f}" if L in c else "–" for L in lens]
                   + [f"{c[L]['decode_tokens_per_s']:,.0f}" if L in c and c[L].get("decode_tokens_per_s")
                      else "–" for L in lens]
                   + [f"{c[lens[-1]]['peak_mb']:,.0f}" if lens and lens[-1] in c else "–"])
    return md_table(head, out)


def throughput_plot(res: dict, path: Path) -> Path:
    plt = _plt()
    by = defaultdict(dict)
    for r in throughput_rows(res):
        if not r.get("skipped"):
            by[r["variant"]][r["seq_len"]] = r
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for v, c in by.items():
        ls = sorted(c)
        a1.plot(ls, [c[L]["train_tokens_per_s"] for L in ls], marker="o", label=v)
        dec = [(L, c[L].get("decode_tokens_per_s")) for L in ls if c[L].get("decode_tokens_per_s")]
        if dec:
            a2.plot(*zip(*dec, strict=True), marker="o", label=v)
    for ax, t in ((a1, "training tokens/s"), (a2, "decode tokens/s at context L")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(t)
    a1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- claims ------------------------------------------------------------------------------------------------
#
# The claims and their checks are declared in a claims file (configs/eval/claims.yaml, format in its header
# and in docs/evaluation.md); the code below knows the result formats and the verdict rules, no variant name.

NOT_MEASURABLE = "not measurable"
MIN_SEEDS = 3  # fewer seeds give no standard error worth a verdict
DEFAULT_CLAIMS = "configs/eval/claims.yaml"

#: the row fields that locate a measurement (a cell) in each task's rows; values of one seed that share a
#: cell are averaged (e.g. S-NIAH's needle depths)
CELL_FIELDS = {"mqar": ("seq_len", "num_kv_pairs"), "niah": ("niah", "length_multiplier"),
               "lm": ("seq_len", "multiplier", "bucket_start"), "throughput": ("seq_len",)}
#: row fields that, with the variant, name a series (`linear/post_training_mc`)
SERIES_FIELDS = {"lm": ("mode",)}
LOWER_IS_BETTER = {"ppl", "ppl_extrapolation", "ar_hit_loss", "other_loss", "loss_by_position", "peak_mb"}
_FIELD_NAMES = {"seq_len": "L={}", "num_kv_pairs": "n={}", "niah": "S-NIAH-{}", "length_multiplier": "{}x",
                "multiplier": "{}x", "bucket_start": "from {}"}
_KINDS = ("order", "better", "gap_closed", "ratio", "between")
_CHECK_KEYS = {"experiment", "metric", "label", "where", "per", "rule", "lower_is_better", "than", "variants",
               *_KINDS}


def load_claims(path: str | Path = DEFAULT_CLAIMS) -> list[dict]:
    """The claims of a claims file, checked: ``[{"claim": text, "checks": [check, ...]}]`` (the format is in
    the header of configs/eval/claims.yaml and in docs/evaluation.md)."""
    path = Path(path)
    if not path.exists():
        from .cli import repo_path

        path = repo_path(str(path))
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    table = raw.get("claims") if isinstance(raw, dict) else None
    if not isinstance(table, list):
        raise ValueError(f"{path}: expected a mapping with a `claims:` list")
    for i, c in enumerate(table):
        where = f"{path}: claims[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("claim"), str) or not isinstance(c.get("checks"), list):
            raise ValueError(f"{where}: needs `claim: text` and `checks: [...]`")
        for j, chk in enumerate(c["checks"]):
            _check_check(chk, f"{where}.checks[{j}]")
    return table


def _check_check(chk, where: str) -> None:
    if not isinstance(chk, dict):
        raise ValueError(f"{where}: a check is a mapping")
    unknown = sorted(set(chk) - _CHECK_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_CHECK_KEYS))})")
    for key in ("experiment", "metric"):
        if not isinstance(chk.get(key), str):
            raise ValueError(f"{where}: `{key}` is required (a name)")
    kinds = [k for k in _KINDS if k in chk]
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of {', '.join(_KINDS)}, got {kinds or 'none'}")
    kind, spec = kinds[0], chk[kinds[0]]
    if kind == "order" and not (isinstance(spec, list) and len(spec) >= 2):
        raise ValueError(f"{where}: `order` lists two or more variants, best first")
    if kind == "better" and not (isinstance(spec, list) and spec and isinstance(chk.get("than"), str)):
        raise ValueError(f"{where}: `better: [variants]` needs `than: variant`")
    if kind == "between" and not (isinstance(spec, list) and len(spec) == 2 and chk.get("variants")):
        raise ValueError(f"{where}: `between: [lo, hi]` needs `variants: [names or glob patterns]`")
    need = {"gap_closed": ("mc", "base", "best", "at_least"), "ratio": ("of", "to", "at_least")}.get(kind, ())
    if need and not (isinstance(spec, dict) and all(k in spec for k in need)):
        raise ValueError(f"{where}: `{kind}` needs {', '.join(need)}")
    if chk.get("rule", "seeds") not in ("seeds", "direct"):
        raise ValueError(f"{where}: rule must be `seeds` or `direct`, got {chk['rule']!r}")
    if not isinstance(chk.get("where", {}), dict):
        raise ValueError(f"{where}: `where` maps row fields to values")


def samples(res: dict, metric: str) -> tuple[dict, dict]:
    """``({series: {cell: {seed: value}}}, {series: training length})`` of one metric of one experiment.

    A cell is a tuple of ``(field, value)`` pairs (:data:`CELL_FIELDS`); a series is a variant, or
    ``variant/mode`` where rows carry a mode. Rows are read from ``res["runs"][*]["rows"]`` (or
    ``res["rows"]``, whose rows name their variant); a row either holds the metric as a field or is a
    ``{"metric": name, "value": x}`` row. Skipped rows (``"skipped"``) and missing values are left out.
    """
    task = res.get("task", "")
    fields = CELL_FIELDS.get(task, ("seq_len",))
    extra = SERIES_FIELDS.get(task, ())
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    train_len: dict = {}
    for run in res.get("runs") or [{"rows": res.get("rows", [])}]:
        for row in run.get("rows", []):
            if row.get("skipped"):
                continue
            if "metric" in row:
                if row["metric"] != metric:
                    continue
                value = row.get("value")
            else:
                value = row.get(metric)
            if value is None:
                continue
            variant = row.get("variant", run.get("variant"))
            series = "/".join([str(variant)] + [str(row[f]) for f in extra if f in row])
            cell = tuple((f, row[f]) for f in fields if f in row)
            acc[series][cell][run.get("seed", 0)].append(float(value))
            if "train_seq_len" in run:
                train_len[series] = run["train_seq_len"]
    data = {s: {c: {seed: sum(v) / len(v) for seed, v in by_seed.items()} for c, by_seed in cells.items()}
            for s, cells in acc.items()}
    return data, train_len


def _matches(value, want, series_train_len) -> bool:
    if want == "train":
        return value == series_train_len
    if isinstance(want, list):
        return value in want
    if isinstance(want, dict):
        tests = {"gt": lambda x: value > x, "ge": lambda x: value >= x, "lt": lambda x: value < x,
                 "le": lambda x: value <= x}
        return value is not None and all(tests[op](x) for op, x in want.items())
    return value == want


def select_cells(data: dict, train_len: dict, series: list[str], where: dict) -> list[tuple]:
    """The cells every one of ``series`` has that pass ``where`` (``max``/``min`` apply last)."""
    common = set.intersection(*(set(data[s]) for s in series))
    cells = [c for c in common if all(_matches(dict(c).get(f), w, train_len.get(s))
                                      for f, w in where.items() if w not in ("max", "min") for s in series)]
    for f, w in where.items():
        if w in ("max", "min") and cells:
            best = (max if w == "max" else min)(dict(c).get(f) for c in cells)
            cells = [c for c in cells if dict(c).get(f) == best]
    return sorted(cells, key=lambda c: [str(v) if not isinstance(v, (int, float)) else v for _, v in c])


def _groups(cells: list[tuple], per: str) -> list[tuple[str, list[tuple]]]:
    """``[(label, cells)]``: one group of all cells, one per cell, or one per value of a field."""
    if per == "all":
        return [("", cells)] if cells else []
    if per == "cell":
        return [(", ".join(_FIELD_NAMES.get(f, f + "={}").format(v) for f, v in c), [c]) for c in cells]
    values = sorted({dict(c).get(per) for c in cells}, key=lambda v: (v is None, v))
    return [(_FIELD_NAMES.get(per, per + "={}").format(v), [c for c in cells if dict(c).get(per) == v])
            for v in values]


def per_seed(data: dict, series: str, cells: list[tuple]) -> list[float]:
    """One value per seed: the mean over ``cells`` of that seed's values (cells of one seed are correlated,
    so the spread that counts is between seeds)."""
    seeds = sorted({s for c in cells for s in data[series][c]})
    return [mean_std([data[series][c][s] for c in cells if s in data[series][c]])[0] for s in seeds]


def contrast(values: dict[str, list[float]], weights: dict[str, float],
             rule: str = "seeds") -> tuple[str, float, float]:
    """``(verdict, d, se)`` for ``d = sum_i w_i mean_i > 0``; ``se = sqrt(sum_i w_i² se_i²)`` (independent
    runs). ``yes``: d > 2 se; ``no``: d < -2 se; ``not measurable``: fewer than :data:`MIN_SEEDS` seeds in
    some series, or |d| <= 2 se. ``rule="direct"`` judges the sign of d alone (measurements without seeds)."""
    stats = {s: mean_se(values[s]) for s in weights}
    d = sum(w * stats[s][0] for s, w in weights.items())
    se = sum((w * stats[s][1]) ** 2 for s, w in weights.items()) ** 0.5
    if rule == "direct":
        return ("yes" if d > 0 else "no"), d, 0.0
    if min(len(values[s]) for s in weights) < MIN_SEEDS:
        return NOT_MEASURABLE, d, se
    if d > 2 * se:
        return "yes", d, se
    if d < -2 * se:
        return "no", d, se
    return NOT_MEASURABLE, d, se


def combine(verdicts: list[str]) -> str:
    """One verdict from several: all the same gives that one, a mix gives ``partly``; ``not measured`` parts
    are left out (all of them: ``not measured``)."""
    vs = [v for v in verdicts if v != NOT_MEASURED]
    if not vs:
        return NOT_MEASURED
    return vs[0] if all(v == vs[0] for v in vs) else "partly"


def _fmt_value(metric: str, x: float) -> str:
    if metric.endswith("tokens_per_s"):
        return f"{x:,.0f}"
    return f"{x:.2f}" if metric in LOWER_IS_BETTER else f"{x:.3f}"


def _fmt_series(metric: str, name: str, xs: list[float], rule: str) -> str:
    m, se = mean_se(xs)
    if rule == "direct" or len(xs) < 2:
        return f"{name} {_fmt_value(metric, m)}"
    return f"{name} {_fmt_value(metric, m)} ± {_fmt_value(metric, se)}"


def _relation(verdict: str, diff: float, rule: str, n_min: int) -> str:
    """How the measurement column relates two values (``diff`` = left - right): ``>``/``<`` beyond 2 SE (any
    difference under ``direct``), ``≈`` within 2 SE, ``vs`` with too few seeds for a verdict."""
    if rule != "direct" and n_min < MIN_SEEDS:
        return "vs"
    if verdict == NOT_MEASURABLE:
        return "≈"
    return ">" if diff > 0 else "<"


def _named(chk: dict, kind: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The series a check names (for ``between``: its two ends first) and, for order/better, its pairs."""
    spec = chk[kind]
    if kind == "order":
        return list(spec), list(zip(spec, spec[1:], strict=False))
    if kind == "better":
        return [*spec, chk["than"]], [(a, chk["than"]) for a in spec]
    if kind == "gap_closed":
        return [spec["mc"], spec["base"], spec["best"]], []
    if kind == "ratio":
        return [spec["of"], spec["to"]], []
    return list(spec), []


def evaluate_check(chk: dict, results: dict[str, dict]) -> tuple[str, str]:
    """``(measurement text, verdict)`` of one declared check on the results (format: :func:`load_claims`)."""
    label = chk.get("label", chk["experiment"])
    res = results.get(chk["experiment"])
    if not res:
        return "", NOT_MEASURED
    metric, rule, per = chk["metric"], chk.get("rule", "seeds"), str(chk.get("per", "all"))
    sign = -1.0 if chk.get("lower_is_better", metric in LOWER_IS_BETTER) else 1.0
    kind = next(k for k in _KINDS if k in chk)
    spec = chk[kind]
    data, train_len = samples(res, metric)
    named, pairs = _named(chk, kind)
    missing = [s for s in named if s not in data]
    note = f" (no {', '.join(missing)} in {chk['experiment']})" if missing else ""
    if missing and kind in ("order", "better"):  # compare the variants that were run, as the order stands
        named = [s for s in named if s in data]
        pairs = (list(zip(named, named[1:], strict=False)) if kind == "order" else
                 [(a, b) for a, b in pairs if a in data and b in data])
    if (missing and kind not in ("order", "better")) or (kind in ("order", "better") and not pairs):
        return f"{label}: nothing to compare{note} ({NOT_MEASURED})", NOT_MEASURED
    if kind == "between":
        named += sorted({s for s in data for p in chk["variants"] if fnmatch.fnmatchcase(s, p)} - set(named))
    groups = _groups(select_cells(data, train_len, named, chk.get("where") or {}), per)
    if not groups:
        return f"{label}: no cell that every variant has ({NOT_MEASURED})", NOT_MEASURED

    def show(s: str, vals: dict) -> str:
        return _fmt_series(metric, s, vals[s], rule)

    verdicts: list[str] = []
    texts: list[str] = []
    pair_stats: list[tuple[str, float]] = []  # (verdict, a - b) of every pair of every group, in order
    n_min = MIN_SEEDS
    for _, cells in groups:
        vals = {s: per_seed(data, s, cells) for s in named}
        n = min(len(v) for v in vals.values())
        n_min = min(n_min, n)
        mean = {s: mean_se(v)[0] for s, v in vals.items()}
        if kind in ("order", "better"):
            out = [contrast(vals, {a: sign, b: -sign}, rule)[0] for a, b in pairs]
            verdicts += out
            pair_stats += [(v, mean[a] - mean[b]) for (a, b), v in zip(pairs, out, strict=True)]
            rel = [_relation(v, mean[a] - mean[b], rule, n) for (a, b), v in zip(pairs, out, strict=True)]
            if kind == "order":
                texts.append(show(named[0], vals) + "".join(f" {r} {show(b, vals)}"
                                                            for (_, b), r in zip(pairs, rel, strict=True)))
            else:
                texts.append("; ".join(f"{show(a, vals)} {r} {show(b, vals)}"
                                       for (a, b), r in zip(pairs, rel, strict=True)))
        elif kind == "gap_closed":
            mc, base, best, f = spec["mc"], spec["base"], spec["best"], float(spec["at_least"])
            # closed >= f  <=>  (mc - base) - f (best - base) > 0: a linear contrast with its own SE
            v, d, _ = contrast(vals, {mc: sign, base: -sign * (1 - f), best: -sign * f}, rule)
            verdicts.append(v)
            gap = mean[best] - mean[base]
            # a gap of about 0.01 or less (best no better than base) gives no meaningful percentage
            closed = f"{100 * (mean[mc] - mean[base]) / gap:.0f}%" if gap > 0.01 else "no gap: –"
            texts.append(f"{show(base, vals)} → {show(mc, vals)} vs {show(best, vals)} ({closed} of the gap "
                         f"closed, {_relation(v, d, rule, n)} {100 * f:.0f}%)")
        elif kind == "ratio":
            a, b, f = spec["of"], spec["to"], float(spec["at_least"])
            v, d, _ = contrast(vals, {a: 1.0, b: -f}, rule)  # of / to >= f on the values themselves
            verdicts.append(v)
            texts.append(f"{mean[a] / mean[b]:.2f} ({_relation(v, d, rule, n)} {f:g})")
        else:  # between: each variant beyond 2 SE above the lower end and below the upper one
            lo, hi = sorted(spec, key=mean.get)
            inside = []
            for s in named[2:]:
                two = [contrast(vals, {s: 1.0, lo: -1.0}, rule)[0], contrast(vals, {hi: 1.0, s: -1.0}, rule)[0]]
                inside.append("no" if "no" in two else combine(two))
            verdicts += inside
            texts.append(", ".join(show(s, vals) for s in named)
                         + f" ({inside.count('yes')}/{len(inside)} between {spec[0]} and {spec[1]})")

    if len(groups) * len(pairs) > 6:  # many comparisons: counts per pair, not a list
        parts = []
        for i, (a, b) in enumerate(pairs):
            st = pair_stats[i::len(pairs)]
            better = sum(sign * d > 0 for _, d in st)
            where = "cells" if per == "cell" else f"{per} values"
            parts.append(f"{a} vs {b}: better mean in {better}/{len(st)} {where}"
                         + (f" (fewer than {MIN_SEEDS} seeds)" if rule != "direct" and n_min < MIN_SEEDS else
                            f", beyond 2 SE in {sum(v == 'yes' for v, _ in st)}, worse beyond 2 SE in "
                            f"{sum(v == 'no' for v, _ in st)}"))
        text = "; ".join(parts)
    elif per == "all":
        text = texts[0]
    else:
        text = "; ".join(f"{g}: {t}" for (g, _), t in zip(groups, texts, strict=True))
    verdict = combine(verdicts)
    return f"{label}: {text}{note} ({verdict})", verdict


def claims(results: dict[str, dict], table: list[dict] | None = None) -> list[tuple[str, str, str]]:
    """``[(claim, our measurement, verdict)]`` of every claim of ``table`` (default: :data:`DEFAULT_CLAIMS`)."""
    table = load_claims() if table is None else table
    out = []
    for c in table:
        done = [evaluate_check(chk, results) for chk in c["checks"]]
        text = "; ".join(t for t, _ in done if t) or "–"
        out.append((c["claim"], text, combine([v for _, v in done])))
    return out


# --- the document ------------------------------------------------------------------------------------------


def build(results: dict[str, dict], out: str | Path = "docs/results.md",
          claims_file: str | Path = DEFAULT_CLAIMS) -> Path:
    """Write the report (markdown + figures) and return its path; the claims come from ``claims_file``."""
    table = load_claims(claims_file)
    out = Path(out)
    figs = out.with_suffix("")
    figs.mkdir(parents=True, exist_ok=True)
    rel = figs.name
    doc = ["# Results: Memory Caching at laptop scale", "",
           "Generated by `mcrnn report` from the JSON that `mcrnn eval` wrote; do not edit by hand. Each section "
           "names the command, experiment file, commit and machine behind its numbers. Reproduce everything with "
           "`mcrnn eval all --jobs 2 --threads 1 && mcrnn report` (CPU), or one experiment with "
           "`mcrnn eval TASK configs/eval/NAME.yaml`. Accuracies are on held-out examples; `a ± b` is the mean "
           "and the standard deviation over seeds (in the claims table: the standard error).", ""]
    total = sum(r.get("wall_seconds", 0) for r in results.values())
    if results:
        doc += [f"Experiments found: {', '.join(results)}; their wall times add up to {total / 60:.0f} min.", ""]

    doc += ["## Paper claims (SPEC.md §4) against our measurements", "",
            f"Each claim is measured by the checks declared in `{claims_file}`; the verdicts follow these "
            f"rules. A comparison holds when the difference of the means over seeds exceeds twice its standard "
            f"error (SE of a difference of means = sqrt(se_a² + se_b²); the gap and ratio checks use the same "
            f"rule on their linear combination). **yes**: every comparison of the claim holds; **no**: every "
            f"one goes the other way beyond 2 SE; **{NOT_MEASURABLE}**: fewer than {MIN_SEEDS} seeds, or "
            f"differences within 2 SE; **partly**: a mix; **{NOT_MEASURED}**: the experiment was not run. "
            f"Throughput checks compare timings directly (no seeds). In the measurements `m ± s` is the mean "
            f"and its standard error over seeds, `>`/`<` a difference beyond 2 SE, `≈` one within 2 SE and "
            f"`vs` two values with too few seeds to tell; each check ends with its own verdict.", "",
            md_table(["claim", "our measurement", "reproduced?"], [list(c) for c in claims(results, table)]), "",
            "The paper's numbers come from 760M–1.3B-parameter models trained on billions of tokens; ours from "
            "~0.1M-parameter models trained for minutes on a CPU. \"Reproduced\" means the *direction* of the "
            "effect holds in our setting, not its size.", ""]

    for name, title in (("mqar", "MQAR: recall beyond a fixed-size state"), ("mqar_deep", "MQAR with a deep memory"),
                        ("mqar_width", "MQAR vs model width"), ("ablations", "Ablations")):
        res = results.get(name)
        doc += [f"## {title}", ""]
        if not res:
            doc += [f"{NOT_MEASURED} (`mcrnn eval mqar configs/eval/{name}.yaml`).", ""]
            continue
        if res.get("description"):
            doc += [res["description"].strip(), ""]
        doc += [provenance(res), "", mqar_table(res), ""]
        div = divergence_table(res)
        doc += (["Examples whose output was not finite (the state overflowed), scored wrong; the fraction per "
                 "cell, mean over seeds:", "", div, ""] if div else ["No example diverged.", ""])
        png = mqar_plot(res, figs / f"{name}.png", name)
        doc += [f"![{name}]({rel}/{png.name})", ""]
        if name == "mqar":
            fp = frontier_plot(res, figs / "frontier.png")
            doc += ["Floats each model holds at the end of a sequence of each evaluated length (all layers: the KV "
                    "cache for attention, the state plus every cached state and key summary for MC; a fixed "
                    "state stays flat):", "", capacity_table(res), "",
                    "Recall against those floats, one panel per length (Zoology's recall-vs-state frontier; "
                    "each point is one variant, mean ± std over seeds at the largest pair count evaluated at that "
                    "length):", "",
                    f"![frontier]({rel}/{fp.name})", ""]
            sp = state_plot([r for k, r in results.items() if k in ("mqar", "mqar_deep", "mqar_width")],
                            figs / "state.png")
            doc += ["Accuracy at the training length and its hardest pair count against the floats each model "
                    "keeps at the end of the sequence (the KV cache for attention, the state plus every cached "
                    "state for MC):", "", f"![state]({rel}/{sp.name})", ""]

    def section(title: str, name: str, body) -> list[str]:
        """A task section (experiment ``name`` = its task): description, provenance and ``body(res)``, or the
        command that measures it."""
        res = results.get(name)
        if not res:
            return [f"## {title}", "", f"{NOT_MEASURED} (`mcrnn eval {name} configs/eval/{name}.yaml`).", ""]
        return [f"## {title}", "", res.get("description", "").strip(), "", provenance(res), "", *body(res)]

    doc += section("Single needle in a haystack (S-NIAH-1/2/3)", "niah", lambda res: [
        "Exact match of the greedy continuation (through `generate` with the model's cache), averaged over the "
        "needle depths (mean ± std over seeds), then the fraction of generated answer bytes right (partial "
        "credit) and the fraction of answer bytes ranked first when the model reads the true answer so far "
        "(teacher-forced, no error compounding):", "", niah_table(res), "",
        *([niah_table(res, "byte_accuracy"), ""] if niah_summary(res, "byte_accuracy") else []),
        *([niah_table(res, "teacher_forced_accuracy"), ""] if niah_summary(res, "teacher_forced_accuracy")
          else []),
        f"![niah]({rel}/{niah_plot(res, figs / 'niah.png').name})", ""])
    doc += section("Language modelling, length extrapolation and post-training MC", "lm", lambda res: [
        "Means over seeds:", "", lm_table(res), "",
        "Perplexity on longer windows of the held-out split (means over seeds); `post_training_mc` is the model "
        "trained with `aggregation: none` read with `aggregation: mean, init: independent, segment_size: L` (same "
        "weights), `post_training_residual` the same with `residual`, `post_training_online<w>` with `mean` and "
        "the online read's share fixed at `w`:", "",
        extrapolation_table(res), "",
        f"![extrapolation]({rel}/{extrapolation_plot(res, figs / 'extrapolation.png').name})", ""])
    doc += section("Throughput and memory of whole models", "throughput", lambda res: [
        throughput_table(res), "", f"![throughput]({rel}/{throughput_plot(res, figs / 'throughput.png').name})", ""])
    out.write_text("\n".join(doc).rstrip() + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mcrnn report", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="*", default=[COMMITTED], help="directories holding experiment results")
    p.add_argument("--collect", default=None, metavar="DIR",
                   help=f"copy DIR/<experiment>/full/results.json into {COMMITTED}/ first (e.g. results/eval)")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--quick", action="store_true", help="read the --quick results instead of the full ones")
    p.add_argument("--claims", default=DEFAULT_CLAIMS, help="the claims and their checks (YAML)")
    args = p.parse_args(argv)
    if args.collect:
        copied = collect(args.collect, COMMITTED)
        if not copied:
            print(f"mcrnn report: no <experiment>/full/results.json under {args.collect}", file=sys.stderr)
            return 2
        print(f"collected {', '.join(copied)} into {COMMITTED}/")
    results = load_results(args.roots, quick=args.quick)
    if not results:
        print(f"mcrnn report: no results.json under {args.roots} (run `mcrnn eval ...` first)", file=sys.stderr)
        return 2
    try:
        path = build(results, args.out, args.claims)
    except (ValueError, FileNotFoundError) as e:
        print(f"mcrnn report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} from {len(results)} experiment(s): {', '.join(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
