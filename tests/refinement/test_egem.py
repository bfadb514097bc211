"""EGEM / PCA-EGEM against closed forms on tiny models (paper 000, Eq. 5, 6; Sec. 4.4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hansgate.refinement.egem import (
    EgemConfig,
    ExposureMinimizer,
    ExposureScale,
    PcaExposure,
    egem_factors,
    mean_factor,
    pca_basis,
    search_lambda,
    triangular_schedule,
)


def _linear_net(d: int = 5) -> nn.Module:
    """x -> Linear(identity) -> ReLU -> Linear: the ReLU output (== x for x >= 0) is refined."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(d))
        net[0].bias.zero_()
    return net.eval()


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_factors_closed_form_and_identity_at_zero():
    m2 = torch.tensor([0.0, 1.0, 4.0])
    assert torch.allclose(egem_factors(m2, 2.0), torch.tensor([0.0, 1 / 3, 4 / 6]))
    assert torch.equal(egem_factors(m2, 0.0), torch.ones(3))


def test_egem_second_moments_and_factors_on_linear_layer():
    x = torch.tensor([[1.0, 2.0, 0.0, 3.0, 0.5], [3.0, 0.0, 0.0, 1.0, 0.5]])
    net = _linear_net()
    em = ExposureMinimizer(EgemConfig(batch_size=1)).fit(net, x)
    assert em.layers_ == ["1"]
    expected_m2 = (x**2).mean(0).double()
    assert torch.allclose(em.moments_["1"].second, expected_m2)
    refined = em.refine(net, lambdas={"1": 2.0})
    scale = [m for m in refined.modules() if isinstance(m, ExposureScale)]
    assert len(scale) == 1
    assert torch.allclose(scale[0].factors, (expected_m2 / (expected_m2 + 2.0)).float())
    # the refined model is the original with activations scaled (Eq. 5)
    probe = torch.rand(4, 5)
    want = net[2](net[1](net[0](probe)) * scale[0].factors)
    assert torch.allclose(refined(probe), want, atol=1e-6)


def test_streaming_moments_do_not_depend_on_batch_size():
    x = torch.rand(53, 1, 8, 8)
    net = _conv_net()
    a = ExposureMinimizer(EgemConfig(pca=True, batch_size=7, precision="float64")).fit(net, x)
    b = ExposureMinimizer(EgemConfig(pca=True, batch_size=1000, precision="float64")).fit(net, x)
    for name in a.layers_:
        assert torch.allclose(a.moments_[name].second, b.moments_[name].second, rtol=1e-10)
        assert torch.allclose(a.moments_[name].mean, b.moments_[name].mean, rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=30), st.floats(0.01, 0.99))
def test_search_lambda_reaches_target(values, tau):
    m2 = torch.tensor(values, dtype=torch.float64)
    lam = search_lambda(m2, tau)
    if mean_factor(m2, 5e-7) < tau:  # already below at the start: start is returned
        assert lam == 5e-7
        return
    assert mean_factor(m2, lam) >= tau
    assert mean_factor(m2, lam * 1.001) < tau + 1e-3  # the largest such lambda, up to bisection precision


def test_float32_statistics_agree_with_float64():
    x = torch.rand(300, 1, 8, 8)
    net = _conv_net()
    refined = {}
    for precision in ("float32", "float64"):
        em = ExposureMinimizer(EgemConfig(pca=True, precision=precision)).fit(net, x)
        refined[precision] = em.refine(net, alpha=0.3)
        if precision == "float32":
            lam32 = dict(em.lambdas_)
    assert all(abs(lam32[k] - v) <= 1e-3 * abs(v) for k, v in em.lambdas_.items())
    probe = x[:16]
    assert torch.allclose(refined["float32"](probe), refined["float64"](probe), rtol=1e-3, atol=1e-4)


def test_search_lambda_tau_one_prunes_only_dead_units():
    m2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    c = egem_factors(m2, search_lambda(m2, 1.0))
    assert c[0] == 0 and torch.all(c[1:] > 0.999)


def test_triangular_schedule():
    assert triangular_schedule(0.2, 1) == [0.2]
    deep = triangular_schedule(0.1, 4, "deep")
    assert deep[0] == pytest.approx(1.0) and deep[-1] == pytest.approx(0.1)
    assert all(math.isclose(a - b, 0.3) for a, b in zip(deep, deep[1:]))
    assert triangular_schedule(0.1, 4, "shallow") == pytest.approx(deep[::-1])


def test_pca_basis_eigenvalues_are_variances_along_components():
    torch.manual_seed(1)
    x = torch.randn(400, 3, dtype=torch.float64) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.1]],
                                                                dtype=torch.float64)
    centred = x - x.mean(0)
    evals, evecs = pca_basis(centred.T @ centred / len(x))
    h = (x - x.mean(0)) @ evecs
    assert torch.allclose((h**2).mean(0), evals, rtol=1e-8)
    assert torch.all(evals[:-1] >= evals[1:])


@pytest.mark.parametrize("conv_mode", ["linear", "ratio"])
def test_pca_egem_lambda_zero_is_identity(conv_mode):
    x = torch.rand(64, 1, 8, 8)
    for net in (_conv_net(), _linear_net()):
        data = x if isinstance(net[0], nn.Conv2d) else torch.rand(64, 5)
        em = ExposureMinimizer(EgemConfig(pca=True, conv_mode=conv_mode)).fit(net, data)
        refined = em.refine(net, lambdas={name: 0.0 for name in em.layers_})
        probe = data[:10] + 0.1
        assert torch.allclose(refined(probe), net(probe), atol=1e-5)


def test_pca_egem_infinite_lambda_collapses_to_mean():
    data = torch.rand(128, 5)
    net = _linear_net()
    em = ExposureMinimizer(EgemConfig(pca=True)).fit(net, data)
    refined = em.refine(net, lambdas={"1": 1e15})
    layer = refined[1].refiner
    out = layer(torch.rand(7, 5) * 10)
    assert torch.allclose(out, data.mean(0).expand(7, 5), atol=1e-5)
    # conv, per channel: every channel sum equals the refinement data's mean channel sum
    x = torch.rand(64, 1, 8, 8)
    conv = _conv_net()
    em = ExposureMinimizer(EgemConfig(pca=True, layers=["1"])).fit(conv, x)
    module = em.refine(conv, lambdas={"1": 1e15})[1].refiner
    sums = module(torch.rand(5, 4, 8, 8) * 3).flatten(2).sum(2)
    assert torch.allclose(sums, em.moments_["1"].mean.float().expand(5, 4), atol=1e-3)


def test_pca_egem_removes_directions_the_data_never_spans():
    """The Clever-Hans property: inputs off the refinement subspace lose their influence."""
    torch.manual_seed(2)
    basis = torch.linalg.qr(torch.randn(5, 2)).Q  # data live in a 2-d subspace (shifted to be >= 0)
    data = torch.randn(200, 2) @ basis.T + 5.0
    net = _linear_net()
    em = ExposureMinimizer(EgemConfig(pca=True)).fit(net, data)
    refined = em.refine(net, lambdas={"1": 1e-6})
    off = torch.linalg.qr(torch.cat([basis, torch.randn(5, 3)], 1)).Q[:, 2:3].flatten()  # orthogonal to the data
    probe = data[:10]
    assert not torch.allclose(net(probe + off), net(probe), atol=1e-3)
    assert torch.allclose(refined(probe + off), refined(probe), atol=1e-3)
    assert torch.allclose(refined(probe), net(probe), atol=1e-3)  # on the data nothing changes


def test_conv_layers_refined_per_channel_and_ratio_mode_projects_sums():
    x = torch.rand(64, 1, 8, 8)
    net = _conv_net()
    em = ExposureMinimizer(EgemConfig(pca=True, conv_mode="ratio", layers=["1"])).fit(net, x)
    assert em.per_element_ == {"1": False}
    module = em.refine(net, lambdas={"1": 0.5})[1].refiner
    assert isinstance(module, PcaExposure)
    a = torch.rand(3, 4, 8, 8) + 0.1
    s = a.flatten(2).sum(2)
    want = (s - module.mean) @ module.projection + module.mean
    assert torch.allclose(module(a).flatten(2).sum(2), want, atol=1e-4)


def test_flattened_map_feeding_linear_layer_is_refined_per_element():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).eval()
    em = ExposureMinimizer(EgemConfig()).fit(net, torch.rand(20, 1, 8, 8))
    assert em.layers_ == ["2"] and em.per_element_ == {"2": True}
    assert em.moments_["2"].dim == 18


def test_refined_layers_are_real_modules_and_original_is_untouched():
    net = _conv_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(32, 1, 8, 8)
    em = ExposureMinimizer(EgemConfig(pca=True)).fit(net, x)
    refined = em.refine(net, alpha=0.5)
    assert any(isinstance(m, PcaExposure) for m in refined.modules())
    assert not any(isinstance(m, PcaExposure) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    inp = x[:4].clone().requires_grad_(True)
    refined(inp).sum().backward()
    assert inp.grad is not None and inp.grad.abs().sum() > 0
    assert set(em.taus_) == set(em.layers_) and set(em.lambdas_) == set(em.layers_)


def test_refine_before_fit_is_an_error():
    from hansgate.errors import ConfigError

    with pytest.raises(ConfigError):
        ExposureMinimizer().refine(_linear_net(), alpha=0.5)


def test_pca_basis_with_dead_units_matches_the_full_decomposition():
    torch.manual_seed(3)
    x = torch.randn(300, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    x[:, [1, 4]] = 0.0  # dead units
    centred = x - x.mean(0)
    cov = centred.T @ centred / len(x)
    evals, evecs = pca_basis(cov)
    assert torch.allclose(evecs.T @ evecs, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(evecs @ torch.diag(evals) @ evecs.T, cov, atol=1e-10)
    assert torch.all(evals[:-1] >= evals[1:]) and torch.equal(evals[-2:], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(evals[:4], torch.linalg.eigvalsh(cov).flip(0)[:4], atol=1e-10)
