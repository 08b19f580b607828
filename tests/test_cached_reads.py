"""The cached-read products of the parallel path against plain loops (float64, outputs and gradients):
`span_weighted_matmul` (grm / residual / mean over linear-read memories) and `selected_matmul` (ssc)."""

import torch
from helpers import assert_close

from mcrnn.ops.utils import selected_matmul, span_weighted_matmul


def _leaves(G=3, T=37, P=6, D=5, V=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(G, P, D, V, generator=g, dtype=torch.float64, requires_grad=True)
    return g, x, W


def test_span_weighted_matmul_matches_a_loop():
    g, x, W = _leaves()
    G, T, P = x.shape[0], x.shape[1], W.shape[1]
    spans = [(0, 5, 0, 0), (5, 12, 0, 2), (12, 30, 1, 5), (30, 37, 0, 6)]
    w = torch.rand(G, T, P, generator=g, dtype=torch.float64)
    inside = torch.zeros(T, P, dtype=torch.bool)
    for t0, t1, p0, p1 in spans:  # weights outside a block's span are 0 (the contract), and get no gradient
        inside[t0:t1, p0:p1] = True
    w = (w * inside).requires_grad_()
    out = span_weighted_matmul(w, x, W, spans)
    ref = sum(w[:, :, p, None] * (x @ W[:, p]) for p in range(P))
    assert_close(out, ref, 1e-12, "output")
    d = torch.randn_like(out)
    ga = torch.autograd.grad((out * d).sum(), [w, x, W])
    gb = torch.autograd.grad((ref * d).sum(), [w, x, W])
    assert_close(ga[0], gb[0] * inside, 1e-12, "dw (inside the spans; 0 outside)")
    assert_close(ga[1], gb[1], 1e-12, "dx")
    assert_close(ga[2], gb[2], 1e-12, "dW")


def test_selected_matmul_matches_a_loop():
    g, x, W = _leaves()
    G, T, P = x.shape[0], x.shape[1], W.shape[1]
    k = 3
    pick = torch.stack([torch.randperm(P, generator=g)[:k] for _ in range(G * T)]).view(G, T, k)
    w = torch.rand(G, T, k, generator=g, dtype=torch.float64)
    valid = torch.rand(G, T, k, generator=g) > 0.2
    w = (w * valid).requires_grad_()  # pairs that are not valid have weight 0
    out = selected_matmul(w, x, W, pick, valid)
    Wsel = W[torch.arange(G).view(G, 1, 1), pick]  # [G, T, k, D, V]
    ref = (w[..., None] * (x[:, :, None, None, :] @ Wsel).squeeze(-2) * valid[..., None]).sum(2)
    assert_close(out, ref, 1e-12, "output")
    d = torch.randn_like(out)
    ga = torch.autograd.grad((out * d).sum(), [w, x, W])
    gb = torch.autograd.grad((ref * d).sum(), [w, x, W])
    assert_close(ga[0] * valid, gb[0] * valid, 1e-12, "dw (valid pairs)")
    assert_close(ga[1], gb[1], 1e-12, "dx")
    assert_close(ga[2], gb[2], 1e-12, "dW")
