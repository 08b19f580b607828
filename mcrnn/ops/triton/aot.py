"""Compile every kernel ahead of time for a GPU architecture, on a machine without one (a build check).

The interpreter runs the kernels' logic on the CPU but never the bf16/fp16 `tl.dot` path nor the compiler:
`compile_all(90)` builds each kernel to a cubin for sm_90 (H100/H200) in bf16 and float32, raising on the
first kernel that does not compile. Needs triton imported in GPU mode (no `TRITON_INTERPRET=1`)."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mcrnn.ops.triton import cached, scan, ssc
from mcrnn.ops.triton._common import INTERPRET, launch_options

_INDEX = {"seg": "*i32", "vis_lo": "*i32", "vis_hi": "*i32", "tok_lo": "*i32", "tok_hi": "*i32", "order": "*i32",
          "offsets": "*i64", "gid": "*i32", "snap_tok": "*i32", "sorted_tok": "*i32", "snap_idx": "*i32",
          "snap_off": "*i32"}
#: pool_S: in the dot dtype; the scan's states, their gradients and its cumulative log decay: float32
_FLOAT32 = {"L", "D", "Z", "z_on", "dZ", "dz_on", "w", "dS", "dw", "g", "h", "h0", "snaps", "dsnap", "dfinal", "dhe",
            "dh0", "dg_end", "dg"}
_SCALARS = {"T": "i32", "P": "i32", "K": "i32", "V": "i32", "NPICK": "i32", "NT": "i32", "E": "i32", "scale": "fp32"}


def _jit_function(kernel) -> triton.runtime.JITFunction:
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap an autotuner or heuristics
        kernel = kernel.fn
    return kernel


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _SCALARS:
            sig[name] = _SCALARS[name]
        elif name in _INDEX:
            sig[name] = _INDEX[name]
        elif name in _FLOAT32 or (fn.__name__.startswith("_ssc") and name in ("o", "dq")):
            sig[name] = "*fp32"
        else:
            sig[name] = "*" + dtype
    return sig


def compile_all(arch: int = 90, dtypes=("bf16", "fp32")) -> list[str]:
    """Compile each kernel in each aggregation mode and dtype for `cuda:sm_{arch}` with its launch settings
    (`_common.LAUNCH`); returns what compiled."""
    if INTERPRET:
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: the interpreter compiles nothing")
    target = GPUTarget("cuda", arch, 32)
    blocks = dict(BT=64, BK=128)
    cases = []
    for agg in (0, 1, 2):
        cases += [(cached._fwd, "fwd", dict(blocks, AGG=agg, BV=64)),
                  (cached._bwd_tokens, "bwd_tokens", dict(blocks, AGG=agg, BV=128)),
                  (cached._bwd_caches, "bwd_caches", dict(blocks, AGG=agg, BV=64))]
    cases += [(ssc._ssc_fwd, "ssc_fwd", dict(blocks, BV=64)), (ssc._ssc_bwd, "ssc_bwd", dict(blocks, BT=32, BV=64))]
    flags = dict(USE_G=True, HAS_O=True, HAS_SNAP=True)
    cases += [(scan._fwd_states, "scan_states", dict(blocks, BV=64, USE_G=True, USE_H0=True)),
              (scan._fwd_out, "scan_out", dict(blocks, BV=64, USE_G=True)),
              (scan._fwd_snap, "scan_snap", dict(blocks, BV=64, USE_G=True)),
              (scan._bwd_states, "scan_bwd_states", dict(blocks, BV=64, **flags)),
              (scan._bwd_dv, "scan_bwd_dv", dict(blocks, BV=64, **flags)),
              (scan._bwd_dqk, "scan_bwd_dqk", dict(blocks, BK=64, BV=64, **flags))]
    done = []
    for dtype in dtypes:
        for kernel, kind, consts in cases:
            fn = _jit_function(kernel)
            consts = {k: v for k, v in dict(consts, LOW_DOT=dtype != "fp32").items() if k in fn.arg_names}
            src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts)
            triton.compile(src, target=target, options=launch_options(kind))
            done.append(f"{fn.__name__}[{dtype}, {consts.get('AGG', '-')}]")
    return done
