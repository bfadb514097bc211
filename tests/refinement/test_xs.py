"""RRR, RBR and TAP (refinement.xs): closed forms, autograd cross-checks and a training smoke test."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hansgate.errors import ConfigError, DataError
from hansgate.nn.models import build_builtin
from hansgate.refinement.xs import (
    TargetedActivations,
    XSConfig,
    downscale_masks,
    explicit_batchnorm,
    influence_map,
    input_gradient,
    rbr_loss,
    rbr_penalty,
    rrr_loss,
    tap_layers,
    tap_loss,
    tap_penalty,
    train_xs,
    xs_objective,
)


def _linear(d_in: int = 16, k: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, k)).double()


def _corner_mask(n: int, size: int = 4, patch: int = 2) -> torch.Tensor:
    m = torch.zeros(n, 1, size, size, dtype=torch.float64)
    m[:, :, :patch, :patch] = 1
    return m


# --------------------------------------------------------------------------- RRR


def test_rrr_matches_closed_form_on_linear_softmax():
    # f = W x + b; d/dx sum_k log softmax_k = sum_k W_k - K sum_k p_k W_k = W^T (1 - K p)
    model = _linear()
    torch.manual_seed(1)
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    mask = _corner_mask(5)
    W = model[1].weight
    p = torch.softmax(model(x), 1)
    grad = ((1 - W.shape[0] * p) @ W).view(5, 1, 4, 4)
    plain = (mask * grad).pow(2).sum((1, 2, 3))
    expected = (plain / mask.sum((1, 2, 3))).mean()  # default: each sample divided by its mask area
    got = rrr_loss(model, x, mask)
    assert torch.allclose(got, expected, rtol=1e-10)
    assert torch.allclose(rrr_loss(model, x, mask, norm="none"), plain.mean(), rtol=1e-10)
    # a [N, H, W] mask is the same mask
    assert torch.allclose(rrr_loss(model, x, mask[:, 0]), expected, rtol=1e-10)


def test_rrr_is_differentiable_in_the_parameters():
    model = _linear()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    mask = _corner_mask(3)
    rrr_loss(model, x, mask).backward()
    W = model[1].weight
    # closed form as a function of (W, b), differentiated by autograd
    W2 = W.detach().clone().requires_grad_(True)
    b2 = model[1].bias.detach().clone().requires_grad_(True)
    p = torch.softmax(x.flatten(1) @ W2.T + b2, 1)
    closed = ((mask * ((1 - W2.shape[0] * p) @ W2).view(3, 1, 4, 4)).pow(2).sum((1, 2, 3)) / 4).mean()
    closed.backward()
    assert torch.allclose(W.grad, W2.grad, rtol=1e-8, atol=1e-12)
    assert W.grad.abs().sum() > 0


def test_rrr_zero_mask_gives_zero_and_bad_mask_is_refused():
    model = _linear()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    assert rrr_loss(model, x, torch.zeros(2, 1, 4, 4)).item() == 0.0
    with pytest.raises(DataError):
        rrr_loss(model, x, torch.zeros(3, 1, 4, 4))
    with pytest.raises(DataError):
        rrr_loss(model, x, torch.zeros(2, 2, 4, 4))


# --------------------------------------------------------------------------- RBR


def test_influence_vanishes_on_linear_softmax():
    # sum_theta dCE/dtheta = (sum_k p_k - 1)(sum_j x_j + 1) = 0 for a linear softmax model
    model = _linear()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    infl = influence_map(model, x, y)
    assert infl.abs().max().item() < 1e-12


def _tiny_mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _param_grad_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    return torch.stack([g.sum() for g in torch.autograd.grad(loss, list(model.parameters()))]).sum()


def test_influence_matches_finite_differences_and_per_sample_autograd():
    model = _tiny_mlp()
    torch.manual_seed(4)
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1])
    infl = influence_map(model, x, y, reduction="sum")
    assert torch.allclose(influence_map(model, x, y), infl / 3, rtol=1e-12)  # default: the batch-mean loss
    # per sample, with its own loss
    for n in range(3):
        xn = x[n : n + 1].detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xn), y[n : n + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        (g,) = torch.autograd.grad(torch.stack([gi.sum() for gi in grads]).sum(), xn)
        assert torch.allclose(infl[n], g[0], rtol=1e-9, atol=1e-12)
    # central finite differences of S(x) = sum_theta dL/dtheta, independent of double backward
    h = 1e-6
    base = x.detach()
    for n, j in [(0, 0), (1, 4), (2, 8)]:
        e = torch.zeros_like(base)
        e.view(3, -1)[n, j] = h
        fd = (_param_grad_sum(model, base + e, y) - _param_grad_sum(model, base - e, y)) / (2 * h)
        assert abs(fd.item() - infl.view(3, -1)[n, j].item()) < 1e-6


def test_rbr_loss_is_eq1_and_trains():
    model = _tiny_mlp()
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    mask = torch.zeros(3, 1, 3, 3, dtype=torch.float64)
    mask[:, :, 0, :] = 1
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    infl, ig = influence_map(model, xg, y, logits, reduction="sum"), input_gradient(logits, xg)
    expected = (mask * (infl / 3) * ig).pow(2).sum()  # reference: batch-mean loss, everything summed
    got = rbr_loss(model, x, y, mask)
    assert torch.allclose(got, expected, rtol=1e-10)
    assert torch.allclose(rbr_penalty(infl / 3, ig, mask), expected)
    per_sample = (mask * (infl * ig).sum(1, keepdim=True)).pow(2).sum((1, 2, 3)).mean()
    assert torch.allclose(rbr_loss(model, x, y, mask, scale="per_sample"), per_sample, rtol=1e-10)
    assert torch.allclose(rbr_penalty(infl, ig, mask, "per_sample"), per_sample)
    got.backward()  # third order: must reach the parameters
    assert all(p.grad is not None for p in model.parameters())
    assert model[1].weight.grad.abs().sum() > 0


def test_explicit_batchnorm_matches_fused_and_is_restored():
    torch.manual_seed(0)
    fused = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).double()
    explicit = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).double()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    fused.train(), explicit.train()
    with explicit_batchnorm(explicit):
        assert not isinstance(explicit[1], nn.BatchNorm2d)
        for _ in range(2):
            assert torch.allclose(explicit(x), fused(x), atol=1e-10)
        explicit.eval(), fused.eval()
        assert torch.allclose(explicit(x), fused(x), atol=1e-10)
    assert isinstance(explicit[1], nn.BatchNorm2d)
    for key, value in fused.state_dict().items():
        assert torch.allclose(explicit.state_dict()[key].double(), value.double(), atol=1e-10), key


def test_rbr_runs_through_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).train()
    x = torch.rand(4, 1, 8, 8)
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, :2, :2] = 1
    loss, parts = xs_objective(model, x, torch.tensor([0, 1, 2, 0]), mask, XSConfig(method="rbr", lam=1.0))
    loss.backward()
    assert parts["xs"] > 0 and model[0].weight.grad is not None and model[1].weight.grad is not None
    assert isinstance(model[1], nn.BatchNorm2d)


# --------------------------------------------------------------------------- TAP


def test_downscale_hand_made_mask():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0, 0] = 1
    same, half = downscale_masks(m, [(8, 8), (4, 4)])
    # reference: a layer of the input's size keeps the mask; then max-pool (the 2x2 corner) and 2x2 averages
    assert torch.equal(same, m)
    expected_half = torch.zeros(4, 4)
    expected_half[0, 0] = 1.0
    assert torch.allclose(half[0, 0], expected_half)
    same, half = downscale_masks(m, [(8, 8), (4, 4)], geometry="adaptive")
    # adaptive, step 1: max-pool 3x3, stride 1, padding 1 widens (0, 0) to the 2x2 corner; size unchanged
    expected_same = torch.zeros(8, 8)
    expected_same[:2, :2] = 1
    assert torch.equal(same[0, 0], expected_same)
    # step 2 (cumulative): widened to the 3x3 corner, then 2x2 average pooling
    expected_half = torch.zeros(4, 4)
    expected_half[0, 0] = 1.0
    expected_half[0, 1] = expected_half[1, 0] = 0.5
    expected_half[1, 1] = 0.25
    assert torch.allclose(half[0, 0], expected_half)


def test_downscale_non_integer_ratio_and_upscaling():
    m = torch.ones(2, 1, 6, 6)
    (small,) = downscale_masks(m, [(4, 4)])
    assert small.shape == (2, 1, 4, 4) and torch.allclose(small, torch.ones_like(small))
    m = torch.zeros(1, 1, 2, 2)
    m[0, 0, 0, 0] = 1
    (big,) = downscale_masks(m, [(4, 4)], kernel=1)
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1
    assert torch.equal(big[0, 0], expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 20), st.lists(st.integers(1, 8), min_size=1, max_size=3), st.integers(0, 10_000))
def test_downscale_is_bounded_and_monotone(size, divisors, seed):
    gen = torch.Generator().manual_seed(seed)
    small = (torch.rand(2, 1, size, size, generator=gen) < 0.1).float()
    large = torch.maximum(small, (torch.rand(2, 1, size, size, generator=gen) < 0.1).float())
    sizes, cur = [], size
    for d in divisors:
        cur = max(1, cur // d)
        sizes.append((cur, cur))
    for a, b in zip(downscale_masks(small, sizes), downscale_masks(large, sizes)):
        assert a.min() >= 0 and b.max() <= 1
        assert (a <= b + 1e-6).all()


def test_tap_penalty_by_hand():
    a1 = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 0, 0] = 1
    (m1,) = downscale_masks(mask, [(4, 4)])
    amap = a1.sum(1, keepdim=True)
    expected = (m1 * amap).pow(2).sum((1, 2, 3)).mean()
    assert torch.allclose(tap_penalty([a1], mask), expected)
    assert torch.allclose(tap_penalty([a1], mask, norm="l1"), (m1 * amap).abs().sum((1, 2, 3)).mean())
    # two layers: the mean over layers
    a2 = torch.ones(2, 3, 2, 2)
    m1b, m2 = downscale_masks(mask, [(4, 4), (2, 2)])
    two = ((m1b * amap).pow(2).sum((1, 2, 3)) + (m2 * 3).pow(2).sum((1, 2, 3))) / 2
    assert torch.allclose(tap_penalty([a1, a2], mask), two.mean())
    with pytest.raises(ConfigError):
        tap_penalty([], mask)


def test_tap_layers_and_hooks_are_scoped():
    assert tap_layers(build_builtin("mnist_cnn")) == ["pool1", "pool2"]
    assert tap_layers(build_builtin("small_vgg")) == ["features.4", "features.9"]
    assert tap_layers(build_builtin("small_resnet")) == ["layer1", "layer2"]
    with pytest.raises(ConfigError):
        tap_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    model = build_builtin("small_vgg")
    with TargetedActivations(model, tap_layers(model)) as rec:
        model(torch.rand(2, 1, 28, 28))
        assert [tuple(o.shape) for o in rec.outputs] == [(2, 16, 14, 14), (2, 32, 7, 7)]
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ConfigError):
        TargetedActivations(model, ["nope"])


def test_tap_loss_matches_objective_and_needs_no_second_order():
    model = build_builtin("mnist_cnn").train()
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    mask = torch.zeros(4, 28, 28)
    mask[:, :4, :4] = 1
    cfg = XSConfig(method="tap", lam=0.5)
    with TargetedActivations(model, tap_layers(model)) as rec:
        total, parts = xs_objective(model, x, y, mask, cfg, rec)
    alone = tap_loss(model, x, mask)
    assert abs(parts["xs"] - alone.item()) < 1e-5
    assert abs(total.item() - (parts["ce"] + 0.5 * parts["xs"])) < 1e-4
    with pytest.raises(ConfigError):
        xs_objective(model, x, y, mask, cfg, None)


# --------------------------------------------------------------------------- training


def test_train_xs_smoke_tap_lowers_the_penalty(tmp_path):
    from hansgate.data.decoy import DecoyConfig, make_decoy

    data = make_decoy(DecoyConfig(train_copies=1, test_copies=1)).subset(160)
    losses: dict[str, list[dict[str, float]]] = {}
    models = {}
    for method, lam in (("none", 0.0), ("tap", 1.0), ("rrr", 1e6)):
        torch.manual_seed(0)
        model = build_builtin("mnist_cnn")
        cfg = XSConfig(method=method, lam=lam, epochs=2, batch_size=64)
        losses[method] = []
        models[method] = train_xs(model, data.x_train, data.y_train, data.mask_train, cfg,
                                  callback=lambda e, p, m=method: losses[m].append(p))
        assert not models[method].training and len(losses[method]) == 2
        assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        tap_none = tap_loss(models["none"], data.x_test[:128], data.mask_test[:128]).item()
        tap_tap = tap_loss(models["tap"], data.x_test[:128], data.mask_test[:128]).item()
    assert tap_tap < tap_none
    rrr_none = rrr_loss(models["none"], data.x_test[:64], data.mask_test[:64]).item()
    rrr_rrr = rrr_loss(models["rrr"], data.x_test[:64], data.mask_test[:64]).item()
    assert rrr_rrr < rrr_none
    with pytest.raises(DataError):
        train_xs(build_builtin("mnist_cnn"), data.x_train, data.y_train[:-1], data.mask_train, XSConfig())
