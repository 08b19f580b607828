"""The ``mcrnn`` command line.

    mcrnn train CONFIG.yaml [--resume [CKPT]] [--stop-at STEP] [--section.key=value ...]
    mcrnn demo [--quick] [--out DIR]
    mcrnn eval TASK CONFIG.yaml [--quick] [--out DIR] [--jobs N] [--threads N] [--only V1,V2] [--base.section.key=value]
    mcrnn eval all [--quick] [--jobs N] [--threads N]      # every configs/eval/*.yaml (the full sweep)
    mcrnn report [RESULTS_DIR ...] [--out docs/results.md]
    torchrun --nproc_per_node N -m mcrnn train CONFIG.yaml ...   # DDP
"""

from __future__ import annotations

import argparse
import json
import sys


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mcrnn train", description="Train a model from a YAML config (sections model/data/train).",
        epilog="Any other --section.key=value (e.g. --train.lr=3e-4 --model.aggregation=grm) overrides the "
               "config; values are read as YAML.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from CKPT (default: OUT_DIR/ckpt.pt)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop (and checkpoint) after STEP, leaving the schedule of train.steps")
    args, rest = p.parse_known_args(argv)

    from mcrnn.train import load_config, train
    from mcrnn.train.trainer import cleanup

    try:
        cfg = load_config(args.config, rest)
    except ValueError as e:
        print(f"mcrnn train: bad config: {e}", file=sys.stderr)
        return 2
    try:
        res = train(cfg, resume=args.resume, stop_at=args.stop_at)
    finally:
        cleanup()
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(res))
    return 0


def _eval(argv: list[str]) -> int:
    from mcrnn.eval.cli import main as eval_main

    return eval_main(argv)


def _report(argv: list[str]) -> int:
    from mcrnn.eval.report import main as report_main

    return report_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"train": _train, "demo": None, "eval": _eval, "report": _report}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from mcrnn.experiments.demo import main as demo_main

        return demo_main(argv[1:])
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
