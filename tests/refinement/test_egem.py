"""EGEM / PCA-EGEM against closed forms on tiny models (paper 000, Eq. 5, 6; Sec. 4.4).

The reference formulas themselves are re-derived in test_egem_oracle.py; the schedule and
the lambda search are tested in test_schedule.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hansgate.refinement.egem import (
    EgemConfig,
    ExposureMinimizer,
    ExposureScale,
    PcaExposure,
    select_alpha,
)
from hansgate.refinement.pca import dual_basis, pca_basis, pca_spectrum, resolvent_projection


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


def test_fit_restores_the_callers_mode_and_sets_state_only_in_fit():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    net.train()
    net[1].eval()  # mixed flags must come back exactly
    bn_before = net[1].running_mean.clone()
    x = torch.rand(40, 1, 8, 8)
    em = ExposureMinimizer(EgemConfig(pca=True, layers=["2"]))
    assert not hasattr(em, "moments_")
    em.fit(net, x)
    assert net.training and not net[1].training and net[3].training
    assert torch.equal(net[1].running_mean, bn_before)  # statistics were read in eval mode
    plan = em.plan(0.5)
    assert set(plan) == {"2"} and plan["2"][0] == 1.0  # one refined layer: tau = 1
    res = select_alpha(net, x, net.eval()(x).argmax(1), EgemConfig(layers=["2"], repetitions=2,
                                                                   alpha_grid=(0.1, 0.9)))
    net.train()
    assert res.model.training is False and res.alpha in (0.1, 0.9)


def test_dual_route_for_fewer_samples_than_units_matches_the_covariance_route():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
    x = torch.randn(15, 4)
    em = ExposureMinimizer(EgemConfig(pca=True, solver="eigh")).fit(net, x)
    default = ExposureMinimizer(EgemConfig(pca=True)).fit(net, x)  # spectrum at fit, resolvent at refine
    assert default.bases_ == {} and torch.allclose(default.variances_["1"], em.variances_["1"], atol=1e-12)
    mom = em.moments_["1"]
    assert mom.kind == "data" and mom.n == 15 and em.variances_["1"].shape == (15,)
    evals, evecs = pca_basis(mom.covariance)
    assert torch.allclose(em.variances_["1"], evals[:15], atol=1e-12)
    assert int((em.variances_["1"] > 0).sum()) <= 14  # centred: rank <= N - 1
    basis = em.bases_["1"]
    for lam in (1e-3, 0.5):  # the same projection as the D x D decomposition
        want = (evecs * (evals / (evals + lam))) @ evecs.T
        got = (basis * (em.variances_["1"] / (em.variances_["1"] + lam))) @ basis.T
        assert torch.allclose(got, want, atol=1e-10)
        refined = default.refine(net, lambdas={"1": lam})[1].refiner.projection.double()
        assert torch.allclose(refined, want, atol=1e-6)  # float32 buffer
    d_evals, d_vecs = dual_basis(torch.zeros(3, 5))  # no variance at all: nothing kept, no NaN
    assert torch.equal(d_evals, torch.zeros(3)) and torch.equal(d_vecs, torch.zeros(5, 3, dtype=torch.float64))


def test_float64_keeps_the_small_components_that_the_float32_rank_floor_zeroes():
    torch.manual_seed(7)
    q = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64)).Q
    spectrum = torch.logspace(0, -6, 200, dtype=torch.float64)  # real components down to 1e-6 of the largest
    cov = (q * spectrum) @ q.T
    e64, _ = pca_basis(cov)
    e32, _ = pca_basis(cov, torch.float32)
    assert int((e64 > 0).sum()) == 200
    assert torch.allclose(e64, spectrum, rtol=1e-6)
    assert int((e32 == 0).sum()) > 20  # float32's floor (max * D * eps32 ~ 2.4e-5) drops them


def test_linear_conv_mode_stays_available_and_differs_from_ratio_on_zero_entries():
    x = torch.rand(64, 1, 8, 8)
    net = _conv_net()
    outs = {}
    for mode in ("ratio", "linear"):
        em = ExposureMinimizer(EgemConfig(pca=True, conv_mode=mode, layers=["1"])).fit(net, x)
        outs[mode] = em.refine(net, lambdas={"1": 0.5})[1].refiner
    a = torch.relu(torch.randn(3, 4, 8, 8))
    assert torch.all(outs["ratio"](a)[a == 0] == 0)  # the authors' per-channel rescaling keeps zeros
    assert not torch.all(outs["linear"](a)[a == 0] == 0)
    assert torch.allclose(outs["ratio"](a).flatten(2).sum(2), outs["linear"](a).flatten(2).sum(2), atol=1e-4)


def test_select_alpha_final_fit_all_refits_on_every_sample():
    net = _linear_net()
    x = torch.rand(30, 5)
    y = net(x).argmax(1)
    split = select_alpha(net, x, y, EgemConfig(pca=True, repetitions=1, alpha=0.5))
    full = select_alpha(net, x, y, EgemConfig(pca=True, repetitions=1, alpha=0.5, final_fit="all"))
    assert split.alpha == full.alpha == 0.5
    assert split.minimizer.moments_["1"].n == 24 and full.minimizer.moments_["1"].n == 30


def test_resolvent_projection_is_the_eigenbasis_projection_and_steps_aside_near_the_floor():
    torch.manual_seed(8)
    q = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64)).Q
    cov = (q * torch.logspace(2, -8, 40, dtype=torch.float64)) @ q.T
    cov = torch.block_diag(cov, torch.zeros(3, 3, dtype=torch.float64))[[*range(20), 40, *range(20, 40), 41, 42]]
    cov = cov[:, [*range(20), 40, *range(20, 40), 41, 42]]  # dead units inside and at the end
    evals, evecs = pca_basis(cov)
    assert torch.allclose(pca_spectrum(cov), evals, rtol=1e-10, atol=1e-12)  # to max * eps
    for lam in (1e-6, 1e-2, 10.0):
        got = resolvent_projection(cov, lam, float(evals[0]))
        assert got is not None
        want = (evecs * (evals / (evals + lam))) @ evecs.T
        assert torch.allclose(got, want, atol=1e-9)
        assert torch.equal(got[20], torch.zeros(43, dtype=torch.float64))  # dead unit: exactly removed
    # lambda near the rank floor: the bound on the floored components' factor fails, the basis is used
    assert resolvent_projection(cov, 1e-13, float(evals[0])) is None


def test_default_resolvent_route_matches_the_eigenbasis_route():
    x = torch.rand(200, 1, 8, 8)
    net = _conv_net()
    fits = {s: ExposureMinimizer(EgemConfig(pca=True, solver=s)).fit(net, x) for s in ("resolvent", "eigh")}
    assert fits["resolvent"].bases_ == {} and set(fits["eigh"].bases_) == set(fits["eigh"].layers_)
    for alpha in (0.01, 0.5, 1.0):
        assert fits["resolvent"].plan(alpha) == fits["eigh"].plan(alpha)
        a, b = (fits[s].refine(net, alpha) for s in fits)
        for name in fits["eigh"].layers_:
            assert torch.allclose(a.get_submodule(name).refiner.projection, b.get_submodule(name).refiner.projection,
                                  atol=1e-6)
        assert torch.allclose(a(x[:8]), b(x[:8]), atol=1e-5)
    # a lambda close to the rank floor falls back to the eigenbasis (computed once, kept)
    em = fits["resolvent"]
    tiny = {name: 1e-14 for name in em.layers_}
    em.refine(net, lambdas=tiny)
    assert set(em._eigenbases) == set(em.layers_)


def test_spectrum_reads_the_lower_triangle_of_the_streamed_moments():
    torch.manual_seed(9)
    x = torch.randn(90, 7, dtype=torch.float64) @ torch.randn(7, 7, dtype=torch.float64) + 3.0
    x[:, 2] = 0.0  # a dead unit
    from hansgate.refinement.pca import LayerMoments

    mom = LayerMoments.empty(7, (7,), "full")
    for start in range(0, 90, 32):
        mom.update(x[start : start + 32])
    centred = x - x.mean(0)
    want = centred.T @ centred / 90
    assert torch.allclose(mom.covariance, want, atol=1e-10)
    assert torch.allclose(mom.covariance_lower().tril(), want.tril(), atol=1e-10)
    lower = mom.covariance_lower()
    assert torch.allclose(pca_spectrum(lower), pca_basis(want)[0], atol=1e-10)
    assert torch.equal(lower, mom.covariance_lower())  # the caller's matrix is not overwritten


def test_signed_maps_take_the_linear_rule_and_post_relu_maps_the_ratio_rule():
    """The ratio rule divides by channel sums: only non-negative maps keep it (pca module doc)."""
    torch.manual_seed(0)
    signed = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    relu = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    x = torch.randn(64, 1, 8, 8)
    cfg = EgemConfig(pca=True, layers=["0"], max_element_units=1)
    assert ExposureMinimizer(cfg).fit(signed, x).conv_modes_ == {"0": "linear"}
    cfg = EgemConfig(pca=True, layers=["1"], max_element_units=1)
    assert ExposureMinimizer(cfg).fit(relu, x).conv_modes_ == {"1": "ratio"}
    refined = ExposureMinimizer(EgemConfig(pca=True, layers=["0"], max_element_units=1)).fit(signed, x).refine(signed, 0.5)
    assert torch.isfinite(refined(x)).all()


def test_a_candidate_sharing_weights_is_the_deep_copy_and_leaves_the_original_alone():
    net = _conv_net()
    x = torch.rand(32, 1, 8, 8)
    em = ExposureMinimizer(EgemConfig(pca=True)).fit(net, x)
    deep, shared = em.refine(net, alpha=0.5), em.refine(net, alpha=0.5, share_weights=True)
    assert shared[0].weight is net[0].weight and deep[0].weight is not net[0].weight  # no second set of weights
    assert not any(isinstance(m, PcaExposure) for m in net.modules())  # the original's modules are not changed
    with torch.no_grad():
        assert torch.equal(shared(x), deep(x))


def test_large_images_stream_their_statistics_in_smaller_batches(monkeypatch):
    from hansgate.nn import training

    net = _conv_net()
    x = torch.rand(40, 1, 8, 8)
    seen: list[int] = []
    handle = net[0].register_forward_hook(lambda m, i, o: seen.append(len(o)))
    whole = ExposureMinimizer(EgemConfig(pca=True, precision="float64")).fit(net, x)
    monkeypatch.setattr(training, "FORWARD_VALUES", 64 * 9)  # 9 images of 1 x 8 x 8 per batch
    seen.clear()
    small = ExposureMinimizer(EgemConfig(pca=True, precision="float64")).fit(net, x)
    handle.remove()
    assert max(seen) == 9  # (the two-image traces of the layer choice aside)
    for name in whole.layers_:
        assert torch.allclose(small.moments_[name].second, whole.moments_[name].second, rtol=1e-10)
    probe = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small.refine(net, alpha=0.5)(probe), whole.refine(net, alpha=0.5)(probe),
                                   rtol=1e-6, atol=1e-6)
