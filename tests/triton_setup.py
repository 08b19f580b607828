"""How the Triton test modules import the kernels (shared by tests/test_triton*.py).

Without CUDA the kernels run in Triton's interpreter: importing this module puts `TRITON_INTERPRET=1` in the
environment while it imports triton (triton fixes the mode at its first import, which this is, unless an earlier
module imported triton or `torch._dynamo`) and takes it out again, so the rest of the suite sees the environment
it had. When an earlier module did import triton (in the whole suite, transformers does), the kernel tests skip
(`kernels_runnable`) and each module's `test_interpreter_in_fresh_process` runs it in a fresh process instead
(:func:`run_in_fresh_process`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
_SET_INTERPRET = not CUDA and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    import mcrnn.ops.triton as mt
finally:
    if _SET_INTERPRET:
        del os.environ["TRITON_INTERPRET"]

#: the kernels can run in this process: compiled on CUDA, or interpreted because triton was first imported here
RUNNABLE = CUDA or mt.INTERPRET
NOT_RUNNABLE = ("triton was imported in GPU mode before this module (transformers imports torch._dynamo, which "
                "imports triton) and there is no CUDA: test_interpreter_in_fresh_process runs this file instead")
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if mt.INTERPRET else "cuda"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA or mt.INTERPRET, reason="needs a CUDA device (compiled kernels)")
fresh_process_only = pytest.mark.skipif(RUNNABLE, reason="the kernels run in this process")


@pytest.fixture(autouse=True)
def kernels_runnable(request):
    """Skip a kernel test when the kernels cannot run in this process (see the module docstring)."""
    if not RUNNABLE and request.node.originalname != "test_interpreter_in_fresh_process":
        pytest.skip(NOT_RUNNABLE)


def run_in_fresh_process(test_file: str) -> None:
    """Run `test_file`'s interpreter tests in a fresh process, where triton is imported in interpreter mode."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
           str(Path(test_file).resolve())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


def fresh_process_test(test_file: str):
    """The test a kernel test module binds as `test_interpreter_in_fresh_process = fresh_process_test(__file__)`."""

    @fresh_process_only
    def test_interpreter_in_fresh_process():
        """When an earlier test module imported triton in GPU mode on a CPU-only machine (the whole suite in one
        process), the module's interpreter tests run in a fresh process, where it imports triton first."""
        run_in_fresh_process(test_file)

    return test_interpreter_in_fresh_process
