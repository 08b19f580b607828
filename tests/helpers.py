"""Tiny shared test harness: inputs, fla-style relative error, gradient collection."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """fla-style relative error: max |a - b| over max |b| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


def assert_close(a, b, tol: float, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_inputs(B=2, T=37, H=3, K=4, V=5, gate_names=(), dtype=torch.float64, seed=0, grad=True, with_u=True):
    """q, k, v, u `[B, T, H, *]` and gates `[B, T, H]` in (0, 1), leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    q, k, u = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    gates = {n: torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.9 + 0.05 for n in gate_names}
    cast = lambda x: x.to(dtype).requires_grad_(grad)
    return cast(q), cast(k), cast(v), (cast(u) if with_u else None), {n: cast(x) for n, x in gates.items()}


def grads(out: torch.Tensor, tensors, weight: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of `<out, weight>` w.r.t. `tensors` (zeros for unused ones)."""
    return list(
        torch.autograd.grad((out * weight).sum(), list(tensors), allow_unused=True, materialize_grads=True,
                            retain_graph=True)
    )


def slice_gates(gates: dict, t0: int, t1: int) -> dict:
    return {n: x[:, t0:t1] for n, x in gates.items()}
