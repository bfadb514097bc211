"""RGEM / Ridge closed forms (paper 000, Supp. D) and the slack rule (Sec. 4.4)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hansgate.nn.training import TrainConfig, accuracy, train_classifier
from hansgate.refinement.baselines import (
    last_linear,
    retrain_checkpoints,
    ridge_moments,
    ridge_solve,
    with_last_layer,
)
from hansgate.refinement.methods import RefineConfig, refine_model
from hansgate.refinement.selection import Candidate, select_by_slack, validation_split


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def test_rgem_with_vanishing_lambda_reproduces_the_last_layer():
    net, x = _net(), torch.randn(200, 4)
    layer = last_linear(net, x[:2])
    assert layer == "2"
    gram, cross = ridge_moments(net, layer, x, None, batch_size=17)
    w, b = ridge_solve(gram, cross, 1e-10)
    assert torch.allclose(w, net[2].weight, atol=1e-4) and torch.allclose(b, net[2].bias, atol=1e-4)


def test_ridge_matches_normal_equations_and_leaves_bias_unpenalised():
    net, x = _net(), torch.randn(100, 4)
    y = torch.randn(100, 3, dtype=torch.float64)
    gram, cross = ridge_moments(net, "2", x, y)
    feats = torch.relu(net[0](x)).double()
    a = torch.cat([feats, torch.ones(100, 1, dtype=torch.float64)], 1)
    lam = 0.7
    reg = torch.eye(7, dtype=torch.float64) * lam
    reg[-1, -1] = 0
    want = torch.linalg.solve(a.T @ a / 100 + reg, a.T @ y / 100)
    w, b = ridge_solve(gram, cross, lam)
    assert torch.allclose(w, want[:-1].T.float(), atol=1e-5) and torch.allclose(b, want[-1].float(), atol=1e-5)
    w_inf, b_inf = ridge_solve(gram, cross, 1e12)  # huge lambda: weights vanish, bias -> target mean
    assert w_inf.abs().max() < 1e-6 and torch.allclose(b_inf, y.mean(0).float(), atol=1e-5)
    swapped = with_last_layer(net, "2", w, b)
    assert torch.equal(swapped[2].weight, w) and not torch.equal(net[2].weight, w)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.floats(0.5, 1), st.floats(0, 0.5))
def test_slack_rule_picks_strongest_qualifying(accs, orig, slack):
    cands = [Candidate({"i": i}, a) for i, a in enumerate(accs)]
    sel = select_by_slack(cands, orig, slack)
    ok = [c for c in cands if c.val_acc >= (1 - slack) * orig]
    if ok:
        assert sel.chosen == ok[0] and sel.qualified
    else:
        assert sel.chosen == cands[-1] and not sel.qualified


def test_validation_split_is_disjoint_and_rounds_up():
    fit, val = validation_split(11, 0.2, seed=0)
    assert len(val) == 3 and len(fit) == 8 and not set(fit.tolist()) & set(val.tolist())


def test_ridge_moments_read_eval_mode_and_restore_the_callers_flags():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    net.train()
    net[3].eval()  # mixed flags must come back exactly
    x = torch.randn(50, 4)
    stats = net[1].running_mean.clone()
    assert last_linear(net, x[:2]) == "4"
    gram, cross = ridge_moments(net, "4", x, None)
    assert net.training and net[1].training and not net[3].training
    assert torch.equal(net[1].running_mean, stats)  # no batch statistics were updated
    net.eval()
    feats = torch.cat([net[2](net[1](net[0](x))), torch.ones(50, 1)], 1).double()
    assert torch.allclose(gram, feats.T @ feats / 50, atol=1e-10)
    assert torch.allclose(cross, feats.T @ net(x).double() / 50, atol=1e-6)


def _bn_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small batch-norm CNN trained to tell bright-left from bright-right 8x8 images (eval mode)."""
    torch.manual_seed(0)
    x = torch.rand(240, 1, 8, 8)
    y = torch.randint(0, 2, (240,))
    x[y == 0, :, :, :4] += 0.5
    x[y == 1, :, :, 4:] += 0.5
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2))
    train_classifier(net, x, y, TrainConfig(epochs=15, lr=1e-2, batch_size=32))
    return net, x, y


def test_retrain_freezes_batchnorm_and_never_returns_a_model_validation_rejected(monkeypatch):
    """Regression (issue 12): resnet18 collapsed to chance (eval mode) and that checkpoint was returned."""
    net, x, y = _bn_task()
    orig_acc = accuracy(net, x, y)
    assert orig_acc > 0.9
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit, val = validation_split(len(y), 0.2, 0)
    ckpts = retrain_checkpoints(net, x[fit], y[fit], x[val], y[val], (1, 2), TrainConfig(lr=1e-2, batch_size=32))
    bn_keys = [k for k in before if k.startswith(("1.", "4."))]  # the BatchNorm layers
    assert bn_keys and all(torch.equal(ckpts[2][1][k], before[k]) for k in bn_keys)  # statistics and affine
    assert any(not torch.equal(ckpts[2][1][k], before[k]) for k in before if k not in bn_keys)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    # fine-tuned briefly at a sane rate, the batch-norm net stays far from chance in eval mode
    sane = refine_model(net, x, y, RefineConfig(method="retrain", retrain_epochs=(1, 2), retrain_lr=1e-3))
    assert accuracy(sane.model, x, y) > 0.85 and not sane.hyperparameters["kept_original"]

    # every checkpoint wrecked (as resnet18's at Adam 1e-3): validation rejects them all, the original comes back
    def wrecked(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        bad = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        return {e: (0.5, bad) for e in (1, 2)}

    monkeypatch.setattr("hansgate.refinement.methods.retrain_checkpoints", wrecked)
    wild = refine_model(net, x, y, RefineConfig(method="retrain", retrain_epochs=(1, 2)))
    assert wild.hyperparameters["kept_original"] and wild.hyperparameters["epochs"] == 0
    assert accuracy(wild.model, x, y) == orig_acc
