"""Oracles for the RR-ClArC defaults (issue 14): the loss by forward mode and by double backward, one SGD step.

The expected values are re-derived here from paper 001 Eq. 2 and Eq. 5 and
seeds/IMPLEMENTATION-NOTES.md, in closed form for a head ``W2 relu(W1 vec(a) + b1) + b2``
(float64), never through the code under test: the latent gradient of ``m . f`` is
``W1^T (relu'(z) * W2^T m)``, averaged over the spatial positions of each channel, dotted
with the channel CAV; the cross-entropy is weighted by inverse class frequency.
The defaults must match at 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hansgate.refinement.clarc import ClarcConfig, FineTuner, class_weights, fit_concept
from hansgate.refinement.clarc_core import ConceptData

RTOL = 1e-5
C, H, W, K = 2, 3, 3, 4


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.Flatten(), nn.Linear(C * H * W, 5), nn.ReLU(),
                         nn.Linear(5, K)).double()


def _closed_form_loss(params: list[torch.Tensor], a: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                      h: torch.Tensor, lam: float) -> torch.Tensor:
    """``CE_w + lam * mean_n (mean_hw[W1^T (relu'(z_n) * W2^T m_n)] . h)^2`` as an explicit function of the weights."""
    w1, b1, w2, b2 = params
    af = a.flatten(1)
    z = af @ w1.T + b1
    logits = torch.relu(z) @ w2.T + b2
    grad = ((m @ w2) * (z > 0).double()) @ w1  # [N, C*H*W], d(m . f)/da
    g_bar = grad.view(len(a), C, H * W).mean(2)  # averaged over positions (reference)
    penalty = (g_bar @ h).pow(2).mean()
    counts = torch.bincount(y, minlength=K).double()
    w = 1.0 / counts[y]
    ce = (w * -torch.log_softmax(logits, 1)[torch.arange(len(y)), y]).sum() / w.sum()
    return ce + lam * penalty


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(7, C, H, W, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # unbalanced: the weights matter
    h = torch.randn(C, generator=gen, dtype=torch.float64)
    return a, y, h / h.norm()


@pytest.mark.parametrize("double_backward", [False, True])
@pytest.mark.parametrize("mode", ["all", "class", "random"])
def test_rr_loss_and_its_gradient_are_the_closed_form(double_backward, mode):
    model = _model()
    a, y, h = _batch()
    lam = 37.0
    cfg = ClarcConfig(mode=mode, target_class=2)
    assert cfg.pooling == "max" and cfg.class_weighted and cfg.penalty_samples == "batch"
    ft = FineTuner("0", cfg, "rr", h, lam=lam, double_backward=double_backward)
    _, _, head, _ = ft.prepare(model)
    ft.class_weights_ = class_weights(y, K)
    head.eval()
    loss = ft._rr_loss(head, a, y, torch.Generator().manual_seed(5))
    if mode == "all":
        m = torch.ones(7, K, dtype=torch.float64)
    elif mode == "class":
        m = nn.functional.one_hot(torch.full((7,), 2), K).double()
    else:  # the sampling convention: a fair +-1 per sample and logit from the given generator
        m = torch.randint(0, 2, (7, K), generator=torch.Generator().manual_seed(5)).double() * 2 - 1
    params = [p.detach().clone().requires_grad_(True) for p in (model[2].weight, model[2].bias, model[4].weight,
                                                                 model[4].bias)]
    expected = _closed_form_loss(params, a, y, m, h, lam)
    assert abs(loss.item() - expected.item()) <= RTOL * abs(expected.item())
    got = torch.autograd.grad(loss, [p for p in head.parameters() if p.requires_grad])
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=RTOL, atol=RTOL * float(w.abs().max()))


def test_one_default_step_is_sgd_with_momentum_at_1e_4_on_the_closed_form():
    """One batch, one epoch: the first SGD step with momentum is ``theta - lr * grad``; the conv is frozen."""
    model = _model()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 1, H, W, generator=gen, dtype=torch.float64)
    _, y, h = _batch()
    cfg = ClarcConfig(mode="all", epochs=1, batch_size=7)
    assert cfg.optimizer == "sgd" and cfg.lr == 1e-4 and cfg.momentum == 0.9 and cfg.freeze == "conv_bn"
    tuned = FineTuner("0", cfg, "rr", h, lam=11.0).fit(model, x, y).model_
    with torch.no_grad():
        a = model[0](x)
    params = [p.detach().clone().requires_grad_(True) for p in (model[2].weight, model[2].bias, model[4].weight,
                                                                 model[4].bias)]
    grads = torch.autograd.grad(_closed_form_loss(params, a, y, torch.ones(7, K, dtype=torch.float64), h, 11.0),
                                params)
    for name, p, g in zip(("2.weight", "2.bias", "4.weight", "4.bias"), params, grads):
        step = tuned.state_dict()[name] - p.detach()
        assert torch.allclose(step, -1e-4 * g, rtol=RTOL, atol=1e-12), name
    assert torch.equal(tuned.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_default_cav_is_the_signal_cav_of_spatial_maxima():
    """Eq. 2 on per-channel spatial maxima of the concept layer, unit length, oriented to the concept."""
    model = _model().float()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, H, W, generator=gen)
    concept = torch.arange(16) % 2 == 0
    x[concept, :, 0, 0] += 2.0
    data = ConceptData(x, torch.zeros(16, dtype=torch.long), concept)
    cav, z_clean, z_concept = fit_concept(model, "0", data, pooling=ClarcConfig().pooling)
    with torch.no_grad():
        feats = model[0](x).double().amax((2, 3))
    t = concept.double()
    raw = ((feats - feats.mean(0)) * (t - t.mean()).unsqueeze(1)).sum(0)
    expected = raw / raw.norm()
    assert torch.allclose(cav.cav_.double(), expected, rtol=RTOL, atol=1e-6)
    lengths = feats @ expected
    assert z_clean == pytest.approx(float(lengths[~concept].mean()), rel=1e-4)
    assert z_concept == pytest.approx(float(lengths[concept].mean()), rel=1e-4)
