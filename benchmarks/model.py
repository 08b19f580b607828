"""Whole-model training / decoding throughput and peak memory: a command line over `mcrnn.eval.throughput`.

The same code as `mcrnn eval throughput configs/eval/throughput.yaml` (one implementation): every
(variant, length) of the experiment file in its own fresh process, median of several runs, ratios against
attention and the base memory measured in the same run.

    python benchmarks/model.py                                # configs/eval/throughput.yaml, T in {256, 1K, 4K}
    python benchmarks/model.py --quick                        # its quick section (< 30 s)
    python benchmarks/model.py --seq-lens 256 1024 4096 --json results/bench/model.json
    python benchmarks/model.py --only attention linear linear_grm --threads 2
"""

from __future__ import annotations

import sys
from pathlib import Path

# run from a checkout without installing: the repository root holds the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcrnn.eval.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
