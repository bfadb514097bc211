"""Oracles for the XS defaults: RRR and RBR at eval mode, TAP on a divisible geometry (issue 14).

Each expected value is re-derived here from paper 002 Eq. 4 / 6-8, paper 004 Eq. 1 and
seeds/IMPLEMENTATION-NOTES.md in closed form (float64), never through the functions under
test; the defaults must match at 1e-5 relative.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hansgate.refinement.xs import XSConfig, rbr_loss, rrr_loss, tap_loss, xs_objective

RTOL = 1e-5


def _bn_linear(seed: int = 0) -> nn.Sequential:
    """x [N, 2, 3, 3] -> flatten -> Linear(18, 4) -> BatchNorm1d(4) with non-trivial running statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 4), nn.BatchNorm1d(4)).double()
    bn = model[2]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 0.8]))
        bn.weight.copy_(torch.tensor([1.2, 0.7, -0.9, 1.1]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    return model


def _masks(n: int) -> torch.Tensor:
    m = torch.zeros(n, 1, 3, 3, dtype=torch.float64)
    for i in range(n):  # areas 1, 2, 3, ... so that the per-sample normalisation matters
        m[i, 0].view(-1)[: i + 1] = 1
    return m


def _rrr_eval_closed_form(model: nn.Sequential, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Eval mode: logits = s (W x + b - mu) + beta; d/dx sum_k log p_k = W^T (s * (1 - K p))."""
    lin, bn = model[1], model[2]
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    mu, beta = bn.running_mean.numpy(), bn.bias.detach().numpy()
    xf = x.flatten(1).numpy()
    logits = s * (xf @ w.T + b - mu) + beta
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    k = logits.shape[1]
    grad = ((s * (1 - k * p)) @ w).reshape(x.shape)  # [N, C, H, W]
    m = mask.numpy()
    per = ((m * grad.sum(1, keepdims=True)) ** 2).sum((1, 2, 3)) / m.sum((1, 2, 3))
    return float(per.mean())


def test_rrr_default_is_the_eval_mode_area_normalised_closed_form_and_keeps_the_mode():
    model = _bn_linear().train()  # the caller trains: BN would use batch statistics
    torch.manual_seed(1)
    x = torch.rand(5, 2, 3, 3, dtype=torch.float64)
    mask = _masks(5)
    expected = _rrr_eval_closed_form(model, x, mask)
    got = rrr_loss(model, x, mask).item()
    assert abs(got - expected) <= RTOL * abs(expected)
    assert all(m.training for m in model.modules())  # the caller's mode is back
    # inside training: the XS part is the same eval-mode value, the cross-entropy uses train mode
    y = torch.tensor([0, 1, 2, 3, 0])
    before = model[2].running_mean.clone()
    _, parts = xs_objective(model, x, y, mask, XSConfig(method="rrr", lam=2.0))
    assert abs(parts["xs"] - expected) <= RTOL * abs(expected)
    assert not torch.equal(model[2].running_mean, before)  # the training pass updated the statistics
    ce_train = nn.functional.cross_entropy(_bn_linear().train()(x), y).item()
    assert abs(parts["ce"] - ce_train) <= 1e-9 * abs(ce_train)
    # the project's variant: gradients from the training pass itself differ on a batch-norm model
    _, variant = xs_objective(_bn_linear().train(), x, y, mask, XSConfig(method="rrr", lam=2.0, grad_mode="train"))
    assert abs(variant["xs"] - expected) > 1e-3 * abs(expected)


def _mlp(seed: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3), nn.Dropout(0.5)).double()


def _param_grad_sum_closed_form(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``T(x) = sum_theta dL/dtheta`` of the batch-mean cross-entropy of ``W2 tanh(W1 x + b1) + b2`` (eval mode).

    dL/dW2 and dL/db2 sum to 0 (softmax minus one-hot sums to 0 per sample); with
    ``delta_n = (1 - h_n^2) * W2^T (p_n - e_{y_n})``: sum dL/dW1 = mean_n (sum delta_n)(sum x_n),
    sum dL/db1 = mean_n sum delta_n.
    """
    w1, b1, w2, b2 = (t.detach() for t in (model[1].weight, model[1].bias, model[3].weight, model[3].bias))
    xf = x.flatten(1)
    h = torch.tanh(xf @ w1.T + b1)
    p = torch.softmax(h @ w2.T + b2, 1)
    delta = (1 - h**2) * ((p - nn.functional.one_hot(y, 3).double()) @ w2)
    return (delta.sum(1) * (xf.sum(1) + 1)).mean()


def test_rbr_default_is_the_reference_closed_form_at_eval_mode():
    model = _mlp().train()  # dropout on in the caller's mode; RBR must not see it
    torch.manual_seed(4)
    x = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    mask = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    mask[:, :, 0, :] = 1
    mask[1, :, 1, 1] = 1
    # IF by central differences of the closed-form T(x); IG closed form W1^T((1 - h^2) W2^T (1 - K p))
    eps = 1e-6
    infl = torch.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = torch.zeros_like(x)
        e[idx] = eps
        infl[idx] = (_param_grad_sum_closed_form(model, x + e, y) - _param_grad_sum_closed_form(model, x - e, y)) / (2 * eps)
    w1, b1, w2, b2 = (t.detach() for t in (model[1].weight, model[1].bias, model[3].weight, model[3].bias))
    h = torch.tanh(x.flatten(1) @ w1.T + b1)
    p = torch.softmax(h @ w2.T + b2, 1)
    ig = (((1 - 3 * p) @ w2) * (1 - h**2) @ w1).view_as(x)
    expected = float((mask * infl * ig).pow(2).sum())  # summed over batch, channels and pixels
    got = rbr_loss(model, x, y, mask).item()
    assert abs(got - expected) <= RTOL * abs(expected)
    assert model.training and model[4].training
    _, parts = xs_objective(model, x, y, mask, XSConfig(method="rbr", lam=1.0))
    assert abs(parts["xs"] - expected) <= RTOL * abs(expected)


class _TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.p1 = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.p1(self.c1(x)).flatten(1))


def _downscale_by_hand(m: np.ndarray, ratio: int) -> np.ndarray:
    """3x3 max over the neighbourhood (zero padding), then means over ratio x ratio blocks."""
    h, w = m.shape
    widened = np.zeros_like(m)
    for i in range(h):
        for j in range(w):
            widened[i, j] = m[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2].max()
    return widened.reshape(h // ratio, ratio, w // ratio, ratio).mean((1, 3))


def test_tap_default_on_a_divisible_geometry_is_the_closed_form():
    model = _TwoStage().double()
    torch.manual_seed(6)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    mask[0, 0, :3, :2] = 1
    mask[1, 0, 5:, 4:7] = 1
    with torch.no_grad():
        a1 = model.c1(x).sum(1).numpy()  # layer 1: 8x8, the mask's own size (kept as it is)
        a2 = model.p1(model.c1(x)).sum(1).numpy()  # layer 2: 4x4
    terms = []
    for n in range(2):
        m1 = mask[n, 0].numpy()
        m2 = _downscale_by_hand(m1, 2)
        terms.append((((m1 * a1[n]) ** 2).sum() + ((m2 * a2[n]) ** 2).sum()) / 2)
    expected = float(np.mean(terms))
    got = tap_loss(model, x, mask, layers=["c1", "p1"]).item()
    assert abs(got - expected) <= RTOL * abs(expected)


def _rbr_bn_closed_form(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """RBR at eval mode on ``BN(W x + b)``, fully in closed form (paper 004 Eq. 1, ``H^-1 = I``, batch-mean CE).

    With ``r = 1/sqrt(var + eps)``, ``s = gamma r``, ``u_n = r (W x_n + b - mu)``, logits
    ``z_n = gamma u_n + beta``, ``g_n = p_n - e_{y_n}``, ``J_n = diag(p_n) - p_n p_n^T``:
    ``sum_theta dL/dtheta = mean_n [g_n . u_n + (g_n . s)(1 + sum_j x_nj)]`` (W, b, gamma; beta's
    gradient sums to 0), so ``IF_n = (W^T diag(s) J_n (u_n + a_n s) + W^T (r g_n) + (g_n . s) 1) / N``
    with ``a_n = 1 + sum_j x_nj``; ``IG_n = W^T (s (1 - K p_n))``.
    """
    lin, bn = model[1], model[2]
    w, b = lin.weight.detach(), lin.bias.detach()
    r = 1 / torch.sqrt(bn.running_var + bn.eps)
    s, mu, beta = bn.weight.detach() * r, bn.running_mean, bn.bias.detach()
    xf = x.flatten(1)
    n, k = xf.shape[0], w.shape[0]
    u = r * (xf @ w.T + b - mu)
    p = torch.softmax(s / r * u + beta, 1)
    g = p - nn.functional.one_hot(y, k).double()
    a = 1 + xf.sum(1)
    rows = []
    for i in range(n):
        jac = torch.diag(p[i]) - torch.outer(p[i], p[i])
        rows.append((w.T @ (s * (jac @ (u[i] + a[i] * s))) + w.T @ (r * g[i]) + (g[i] @ s)) / n)
    infl = torch.stack(rows).view_as(x)
    ig = ((s * (1 - k * p)) @ w).view_as(x)
    return float((mask * infl * ig).pow(2).sum())


def test_rbr_default_on_batchnorm_is_the_eval_mode_closed_form():
    model = _bn_linear().train()
    torch.manual_seed(7)
    x = torch.rand(5, 2, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    mask = _masks(5)
    expected = _rbr_bn_closed_form(model, x, y, mask)
    got = rbr_loss(model, x, y, mask).item()
    assert abs(got - expected) <= RTOL * abs(expected)
    assert all(m.training for m in model.modules())
    _, parts = xs_objective(model, x, y, mask, XSConfig(method="rbr", lam=1.0))
    assert abs(parts["xs"] - expected) <= RTOL * abs(expected)
    # the project's variants: gradients of the training pass (batch statistics) differ on batch-norm ...
    _, train_mode = xs_objective(_bn_linear().train(), x, y, mask, XSConfig(method="rbr", lam=1.0, grad_mode="train"))
    assert abs(train_mode["xs"] - expected) > 1e-3 * abs(expected)
    # ... and on one input channel the per-sample scale (summed CE, batch mean) is exactly N times the reference
    lin1 = nn.Sequential(nn.Flatten(), nn.Linear(9, 4), nn.BatchNorm1d(4)).double()
    lin1.load_state_dict({**_bn_linear().state_dict(), "1.weight": _bn_linear()[1].weight[:, :9].detach(),
                          "1.bias": _bn_linear()[1].bias.detach()})
    x1 = x[:, :1]
    ref, per_sample = rbr_loss(lin1, x1, y, mask).item(), rbr_loss(lin1, x1, y, mask, scale="per_sample").item()
    assert abs(ref - _rbr_bn_closed_form(lin1, x1, y, mask)) <= RTOL * ref
    assert abs(per_sample - 5 * ref) <= RTOL * per_sample
