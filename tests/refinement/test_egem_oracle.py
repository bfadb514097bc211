"""Oracle tests: the defaults against closed-form re-derivations of the authors' formulas.

Each oracle is written from paper 000 (Eq. 5, 6, Sec. 4.4) and IMPLEMENTATION-NOTES.md in
plain float64 tensor algebra, independent of the estimator's code paths (hooks,
streaming moments, the dual, the modules), and the defaults must match it to 1e-5
relative.
"""

from __future__ import annotations

import torch
from torch import nn

from hansgate.nn.training import accuracy
from hansgate.refinement.egem import EgemConfig, ExposureMinimizer, select_alpha
from hansgate.refinement.selection import validation_split

RTOL = 1e-5


def _net() -> nn.Sequential:
    """conv -> ReLU [refined, read by a conv: per channel] -> conv -> ReLU [refined, pooled: per channel]
    -> flatten -> linear -> ReLU [refined, per element] -> linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


LAYERS = ["1", "3", "7"]


def _taus(alpha: float, n: int) -> list[float]:  # notes: tau_l = 1 - (1 - alpha) l / (L - 1), first layer 1
    return [1.0] if n == 1 else [1 - (1 - alpha) * i / (n - 1) for i in range(n)]


def _lambda(m2: torch.Tensor, tau: float) -> float:  # notes: start at 5e-7, double while the mean factor >= tau
    lam = 5e-7
    while float((m2 / (m2 + lam)).mean()) >= tau:
        lam *= 2
    return lam


@torch.no_grad()
def _acts(net: nn.Sequential, x: torch.Tensor, upto: int, refine=None) -> torch.Tensor:
    """Run ``net[:upto+1]`` in float64, applying ``refine[i](a)`` after each refined index ``i``."""
    a = x.double()
    for i, m in enumerate(net):
        if i > upto:
            break
        a = m.double()(a)
        if refine and i in refine:
            a = refine[i](a)
    net.float()
    return a


def _units(a: torch.Tensor) -> torch.Tensor:  # conv maps: per-image channel sums; vectors: elements
    return a.flatten(2).sum(2) if a.ndim == 4 else a


@torch.no_grad()
def _oracle_logits(net: nn.Sequential, x: torch.Tensor, probe: torch.Tensor, alpha: float, pca: bool) -> torch.Tensor:
    refine: dict = {}
    taus = _taus(alpha, len(LAYERS))
    for name, tau in zip(LAYERS, taus):  # statistics of the original model (refine holds earlier layers' maps
        i = int(name)                    # only for the probe, below)
        s = _units(_acts(net, x, i))
        if not pca:
            m2 = (s**2).mean(0)
            c = m2 / (m2 + _lambda(m2, tau))
            refine[i] = (lambda c: lambda a: a * (c.view(1, -1, 1, 1) if a.ndim == 4 else c))(c)
            continue
        mean = s.mean(0)
        cov = (s - mean).T @ (s - mean) / len(s)
        e, u = torch.linalg.eigh(cov)
        e = e.clamp_min(0)
        k = min(len(s), s.shape[1])
        lam = _lambda(e.flip(0)[:k], tau)
        proj = u @ torch.diag(e / (e + lam)) @ u.T

        def apply(a: torch.Tensor, mean=mean, proj=proj) -> torch.Tensor:
            s = _units(a)
            s_new = (s - mean) @ proj + mean
            if a.ndim == 2:
                return s_new
            return a * torch.where(s != 0, s_new / torch.where(s != 0, s, 1.0), 0.0)[:, :, None, None]

        refine[i] = apply
    return _acts(net, probe, len(net) - 1, refine)


def _check(pca: bool, alpha: float) -> None:
    net = _net()
    x = torch.rand(120, 1, 6, 6)
    em = ExposureMinimizer(EgemConfig(pca=pca, layers=LAYERS, batch_size=32)).fit(net, x)
    assert em.per_element_ == {"1": False, "3": False, "7": True}
    probe = torch.rand(9, 1, 6, 6)
    got = em.refine(net, alpha)(probe).double()
    want = _oracle_logits(net, x, probe, alpha, pca)
    assert torch.allclose(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


def test_egem_multipliers_and_moments_match_the_closed_form():
    for alpha in (0.01, 0.3, 0.9):
        _check(pca=False, alpha=alpha)


def test_pca_egem_ratio_mode_matches_the_closed_form():
    for alpha in (0.01, 0.3, 0.9):
        _check(pca=True, alpha=alpha)


def test_pca_egem_with_fewer_samples_than_units_matches_the_primal_closed_form():
    """N <= D takes the dual route; the oracle decomposes the D x D covariance directly."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(8, 5)
    em = ExposureMinimizer(EgemConfig(pca=True)).fit(net, x)
    assert em.moments_["1"].kind == "data"
    with torch.no_grad():
        a = torch.relu(net[0].double()(x.double()))
        mean = a.mean(0)
        e, u = torch.linalg.eigh((a - mean).T @ (a - mean) / len(a))
        e = e.clamp_min(0)
        lam = _lambda(e.flip(0)[:8], 1.0)  # one refined layer: tau = 1
        probe = torch.randn(6, 5) * 2
        want = net[2].double()((torch.relu(net[0](probe.double())) - mean) @ (u @ torch.diag(e / (e + lam)) @ u.T)
                               + mean)
        net.float()
        for alpha in (0.05, 0.5):
            assert em.plan(alpha)["1"] == (1.0, lam)
            got = em.refine(net, alpha)(probe).double()
            assert torch.allclose(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


def test_selection_protocol_averages_splits_and_keeps_the_first_80_percent_fit():
    net = _net()
    torch.manual_seed(5)
    x = torch.rand(60, 1, 6, 6)
    y = net(x).argmax(1)
    y[::4] = (y[::4] + 1) % 3  # some errors, so alphas differ in validation accuracy
    grid = (0.001, 0.1, 0.5, 0.9)
    cfg = EgemConfig(layers=LAYERS, alpha_grid=grid, repetitions=3, slack=0.05, seed=7)
    got = select_alpha(net, x, y, cfg)
    accs, orig = [0.0] * len(grid), 0.0
    for r in range(3):
        fit, val = validation_split(len(y), 0.2, 7 + r)
        assert len(val) == 12  # 20 % rounded up
        em = ExposureMinimizer(cfg).fit(net, x[fit])
        orig += accuracy(net, x[val], y[val]) / 3
        for i, a in enumerate(grid):
            accs[i] += accuracy(em.refine(net, a), x[val], y[val]) / 3
    ok = [a for a, v in zip(grid, accs) if v >= (1 - 0.05) * orig]  # relative slack, strongest first
    assert got.alpha == (ok[0] if ok else grid[-1])
    assert got.selection.original_val_acc == orig
    first = ExposureMinimizer(cfg).fit(net, x[validation_split(len(y), 0.2, 7)[0]])
    probe = torch.rand(5, 1, 6, 6)
    assert torch.allclose(got.model(probe), first.refine(net, got.alpha)(probe))
