"""hansgate.audit.tcav: latent gradients against closed forms and finite differences, Eq. 9, the t-test, rankings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hansgate.audit.tcav import (
    ConceptRanking,
    TcavConfig,
    directional_derivatives,
    latent_gradients,
    tcav_for_class,
    tcav_score,
    tcav_test,
)
from hansgate.concepts.cav import lift_cav
from hansgate.errors import ConfigError, DataError
from hansgate.nn.models import build_builtin


def _linear_head_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()


def test_latent_gradients_of_a_linear_head_are_its_weights():
    model = _linear_head_model()
    x = torch.rand(5, 1, 8, 8)
    w = model[2].weight.detach().view(3, 2, 36)
    g_mean = latent_gradients(model, "0", x, pooling="mean")
    g_none = latent_gradients(model, "0", x, classes=[2, 0], pooling="none")
    assert g_mean.shape == (5, 3, 2) and g_none.shape == (5, 2, 72)
    assert torch.allclose(g_mean, w.sum(2).expand(5, 3, 2), atol=1e-6)
    assert torch.allclose(g_none[:, 0], w[2].reshape(72).expand(5, 72), atol=1e-6)
    assert torch.allclose(g_none[:, 1], w[0].reshape(72).expand(5, 72), atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_directional_derivative_matches_central_differences(pooling):
    torch.manual_seed(1)
    model = build_builtin("small_vgg").eval().double()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    d = 32 if pooling == "mean" else 32 * 14 * 14
    h = torch.randn(d, dtype=torch.float64)
    h /= h.norm()
    derivs = directional_derivatives(latent_gradients(model, "features.7", x, pooling=pooling).double(), h.float())
    eps = 1e-6

    def shifted(e: float) -> torch.Tensor:
        hook = model.features[7].register_forward_hook(lambda m, i, o: o + e * lift_cav(h, o, pooling))
        try:
            with torch.no_grad():
                return model(x)
        finally:
            hook.remove()

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert torch.allclose(derivs.double(), fd, rtol=1e-3, atol=1e-4)


def test_tcav_score_is_the_positive_share():
    assert tcav_score(torch.tensor([1.0, -1.0, 0.0, 2.0])) == 0.5
    with pytest.raises(DataError):
        tcav_score(torch.tensor([]))


def _synthetic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class gradients lean on e_0; concept data separates along e_0 (t) — e_1 carries nothing."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(200, 6, generator=gen)
    grads[:, 0] += 1.5
    acts = torch.randn(120, 6, generator=gen)
    t = torch.arange(120) % 2 == 0
    return grads, acts, t


def test_significance_test_separates_a_used_concept_from_an_unused_one():
    grads, acts, t = _synthetic()
    used = acts.clone()
    used[t, 0] += 3.0
    res = tcav_test(grads, used, t, TcavConfig(runs=15, seed=0), name="used")
    assert res.score > 0.85 and res.significant and res.verdict == "positive influence"
    assert res.p_value < 0.05 and len(res.scores) == len(res.random_scores) == 15
    neg = acts.clone()
    neg[t, 0] -= 3.0
    assert tcav_test(grads, neg, t, TcavConfig(runs=15)).verdict == "negative influence"
    unused = acts.clone()
    unused[t, 1] += 3.0  # a direction the class gradient does not lean on
    res_u = tcav_test(grads, unused, t, TcavConfig(runs=15, seed=0), name="unused")
    assert abs(res_u.mean - 0.5) < 0.15
    d = res.as_dict()
    assert d["test"].startswith("two-sided") and d["runs"] == 15
    from scipy import stats

    assert d["p_value"] == float(stats.ttest_ind(res.scores, res.random_scores).pvalue)


def test_degenerate_score_lists_get_a_defined_p_value():
    grads = torch.ones(10, 2)  # every derivative has the same sign for any CAV with positive mass
    acts = torch.randn(20, 2, generator=torch.Generator().manual_seed(3)).abs()
    t = torch.arange(20) < 10
    acts[t] += 5
    res = tcav_test(grads, acts, t, TcavConfig(runs=4))
    # the concept's scores are constant (all 1): scipy's t-test still gives a finite p-value here
    from scipy import stats

    assert np.std(res.scores) == 0
    assert res.p_value == float(stats.ttest_ind(res.scores, res.random_scores).pvalue)
    # for two constant lists scipy gives nan; the test defines p = 1 for equal means and 0 otherwise
    from hansgate.audit.tcav import _ttest

    assert _ttest(np.ones(4), np.ones(4)) == (0.0, 1.0)
    assert _ttest(np.ones(4), np.zeros(4))[1] == 0.0 and _ttest(np.zeros(4), np.ones(4))[0] < 0


def test_ranking_puts_the_significant_concept_first():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].weight.view(2, 4, 36)[1, 0] = 1.0  # class 1 reads channel 0 only
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[0].weight[:, 0, 1, 1] = 1.0  # identity-like conv: channel c = input
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 6, 6, generator=gen)
    bright = x + 1.0  # moves every channel up: class 1's logit grows
    ranking = ConceptRanking(TcavConfig(runs=8)).fit(model, "0", x[:30], 1, {
        "bright": (bright[:30], x[30:]),
        "nothing": (x[:30] + 0.01 * torch.randn(30, 1, 6, 6, generator=gen), x[30:]),
    })
    assert ranking.ranking_[0] == "bright"
    assert ranking.results_["bright"].score == 1.0
    assert set(ranking.as_dict()["results"]) == {"bright", "nothing"}
    single = tcav_for_class(model, "0", x[:30], 1, bright[:30], x[30:], TcavConfig(runs=4))
    assert single.score == 1.0


def test_errors():
    model = _linear_head_model()
    with pytest.raises(ConfigError):
        latent_gradients(model, "missing", torch.rand(2, 1, 8, 8))
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Flatten(), shared, nn.Linear(4, 4), shared, nn.Linear(4, 2))
    with pytest.raises(ConfigError):
        latent_gradients(twice, "1", torch.rand(2, 1, 2, 2))
    grads, acts, t = _synthetic()
    with pytest.raises(DataError):
        tcav_test(grads, acts[:, :3], t)
    with pytest.raises(ConfigError):
        tcav_test(grads, acts, t, TcavConfig(cav_kind="pca"))
