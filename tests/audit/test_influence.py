"""Influence through a linear student: Hessian and influence against autograd on tiny data."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hansgate.audit.influence import (
    InfluenceConfig,
    LinearStudentInfluence,
    layer_embeddings,
    softmax_hessian,
)


def _mean_loss(w: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    logits = phi @ w.view(-1, phi.shape[1]).T
    return nn.functional.cross_entropy(logits, y) + 0.5 * reg * (w**2).sum()


def test_softmax_hessian_matches_autograd():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(20, 4))
    w = rng.normal(size=(3, 4))
    y = rng.integers(0, 3, 20)
    logits = phi @ w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    got = softmax_hessian(phi, p, reg=0.1)
    want = torch.autograd.functional.hessian(
        lambda v: _mean_loss(v, torch.from_numpy(phi), torch.from_numpy(y), 0.1), torch.from_numpy(w).flatten())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-10)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)).eval()


def test_embeddings_remove_hooks_and_concatenate_layers():
    model = _tiny_model()
    x = torch.rand(7, 1, 8, 8)
    feats, logits = layer_embeddings(model, x, batch_size=3)
    assert feats.shape == (7, 3 * 6 * 6 + 3) and logits.shape == (7, 3)
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(torch.from_numpy(logits), model(x).detach())
    want = torch.cat([model[0](x).flatten(1), model(x)], 1).detach().double()
    torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-6, atol=1e-6)
    model.train()
    layer_embeddings(model, x)
    assert all(m.training for m in model.modules())  # the caller's mode comes back


def test_influence_equals_closed_form_with_autograd_pieces():
    """-I(t, i) = grad l(t)^T H^{-1} grad l(i) with gradients and Hessian from autograd."""
    model = _tiny_model()
    torch.manual_seed(1)
    x_train = torch.rand(60, 1, 8, 8)
    x_test = torch.rand(4, 1, 8, 8)
    with torch.no_grad():  # centre the logits so that the tiny model predicts every class
        model[3].bias -= model(x_train).mean(0)
    y_test = np.array([0, 1, 2, 0])
    cfg = InfluenceConfig(projection_dim=8, top_k=5, damping=0.0)
    inf = LinearStudentInfluence(cfg).fit(model, x_train)
    w = torch.from_numpy(inf.student_.coef_).flatten().requires_grad_(True)
    phi_tr = torch.from_numpy(inf._features(layer_embeddings(model, x_train, inf.projection_)[0]))
    phi_te = torch.from_numpy(inf._features(layer_embeddings(model, x_test, inf.projection_)[0]))
    y_tr = torch.from_numpy(inf.train_labels_)
    n = len(y_tr)
    reg = 1.0 / (n * cfg.C)
    h = torch.autograd.functional.hessian(lambda v: _mean_loss(v, phi_tr, y_tr, reg), w.detach())

    def grad_of(phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(phi[None] @ w.view(-1, phi.shape[0]).T, y[None])
        (g,) = torch.autograd.grad(loss, w)
        return g

    g_tr = torch.stack([grad_of(phi_tr[i], y_tr[i]) for i in range(n)])
    g_te = torch.stack([grad_of(phi_te[j], torch.tensor(y_test[j])) for j in range(4)])
    want = g_te @ torch.linalg.solve(h, g_tr.T)
    np.testing.assert_allclose(inf.rank(x_test, y_test), want.numpy(), rtol=1e-5, atol=1e-8)
    rep = inf.report(x_test, y_test, np.asarray(inf.train_labels_), np.arange(n) % 2 == 0, x_test + 0.1)
    assert set(rep.rankings) == {"clean_helpful", "clean_harmful", "pasted_helpful", "pasted_harmful"}
    assert rep.fidelity.agreement > 0.5
    # the shares by hand: top-5 training points of each test point by the ranking above
    scores = inf.rank(x_test, y_test)
    top = np.argsort(-scores, axis=1)[:, :5]
    art = np.arange(n) % 2 == 0
    assert rep.top_k_class_share == float((inf.train_labels_[top] == y_test[:, None]).mean(1).mean())
    assert rep.rankings["clean_helpful"].top_k_artifact_share == float(art[top].mean())
    bottom = np.argsort(scores, axis=1)[:, :5]
    assert rep.rankings["clean_harmful"].top_k_class_share == float(
        (inf.train_labels_[bottom] == y_test[:, None]).mean(1).mean())
    assert rep.train_artifact_rate == 0.5 and rep.as_dict()["top_k_class_share"] == rep.top_k_class_share
