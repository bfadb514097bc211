"""hansgate.concepts.cav: closed forms of Eq. 2/7/8, regression CAVs on known directions, layers and pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hansgate.concepts.cav import (
    CAV_KINDS,
    ConceptActivationVector,
    activation_change,
    default_concept_layer,
    layer_activations,
    lift_cav,
    mean_alignment,
    pool_channels,
    pool_gradient,
    pooled_activations,
    sample_alignment,
    signal_cav,
)
from hansgate.errors import ConfigError, DataError
from hansgate.nn.models import build_builtin


def _clusters(n: int = 200, d: int = 8, shift: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic Gaussian clusters; the concept moves samples by ``shift`` along e_0."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen)
    t = torch.arange(n) % 2 == 0
    a[t, 0] += shift
    return a, t


def test_signal_cav_is_eq2_covariance():
    a, t = _clusters()
    expected = ((a.double().numpy() - a.double().numpy().mean(0)) * (t.numpy() - t.numpy().mean())[:, None]).sum(0)
    np.testing.assert_allclose(signal_cav(a, t).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CAV_KINDS)
def test_every_kind_finds_a_known_direction_and_points_to_the_concept(kind):
    a, t = _clusters()
    cav = ConceptActivationVector(kind).fit(a, t)
    assert cav.cav_.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert cav.cav_[0] > 0.8  # isotropic noise: every solver recovers e_0, oriented to t = 1
    assert (cav.score(a[t]).mean() > cav.score(a[~t]).mean()).item()
    if kind != "signal":
        assert cav.regularization_ in cav.grid and 0.5 < cav.val_accuracy_ <= 1.0
        assert len(cav.candidates_) == len(cav.grid)
        held = ConceptActivationVector(kind, selection="holdout").fit(a, t)  # the project's earlier variant
        assert held.regularization_ in held.grid and held.cav_[0] > 0.8


@pytest.mark.parametrize("kind,param", [("ridge", "alpha"), ("svm", "C"), ("logistic", "C")])
def test_cv_gamma_is_the_grid_search_choice(kind, param):
    """The default gamma is what scikit-learn's GridSearchCV (5 stratified folds, the estimator's score,
    ties to the first grid point) picks over the same grid, on the centred features."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import LinearSVC

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(120, 6, generator=gen)
    t = torch.rand(120, generator=gen) < 0.4
    a[t, :2] += 0.6  # overlapping clusters: the grid's scores differ
    grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    cav = ConceptActivationVector(kind, grid=grid).fit(a, t)
    est = {"ridge": RidgeClassifier(fit_intercept=False, class_weight="balanced"),
           "svm": LinearSVC(fit_intercept=False, class_weight="balanced", max_iter=5000, random_state=0),
           "logistic": LogisticRegression(fit_intercept=False, class_weight="balanced", max_iter=2000)}[kind]
    values = list(grid) if param == "alpha" else [1.0 / g for g in grid]
    x = a.double().numpy() - a.double().numpy().mean(0)
    search = GridSearchCV(est, {param: values}, cv=5).fit(x, t.numpy().astype(int))
    chosen = search.best_params_[param]
    assert cav.regularization_ == pytest.approx(chosen if param == "alpha" else 1.0 / chosen)
    scores = [c["val_accuracy"] for c in cav.candidates_]
    np.testing.assert_allclose(scores, search.cv_results_["mean_test_score"], rtol=1e-9)


def test_signal_beats_svm_under_correlated_noise():
    """Haufe et al.: with a distractor correlated to the signal, the filter (SVM) diverges, the pattern does not."""
    gen = torch.Generator().manual_seed(1)
    n = 400
    t = torch.arange(n) % 2 == 0
    noise = torch.randn(n, generator=gen) * 3
    a = torch.stack([t.float() * 2 + noise, noise + 0.1 * torch.randn(n, generator=gen)], 1)
    true = torch.tensor([1.0, 0.0])
    delta = true.expand(50, 2) * 2  # pasting the concept moves samples along e_0 only
    s_signal = mean_alignment(ConceptActivationVector("signal").fit(a, t).cav_, delta)[1]
    s_svm = mean_alignment(ConceptActivationVector("svm").fit(a, t).cav_, delta)[1]
    assert s_signal > 0.99 and s_svm < 0.9


@given(st.integers(1, 5), st.integers(2, 6), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_alignment_matches_eq7_and_eq8(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    h, delta = torch.randn(d, generator=gen), torch.randn(n, d, generator=gen)
    per = [float(h @ r / (h.norm() * r.norm())) for r in delta]
    s, s_bar = mean_alignment(h, delta)
    m = delta.mean(0)
    assert s == pytest.approx(np.mean(per), abs=1e-6)
    assert s_bar == pytest.approx(float(h @ m / (h.norm() * m.norm())), abs=1e-6)
    assert torch.allclose(sample_alignment(h * 7.0, delta).float(), torch.tensor(per), atol=1e-5)  # scale-free


def test_alignment_of_unchanged_samples_is_zero():
    assert sample_alignment(torch.ones(3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]


def test_pooling_and_lift_are_consistent():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 5, 5, generator=gen)
    assert torch.allclose(pool_channels(a, "max"), a.amax((2, 3)))
    assert torch.allclose(pool_channels(a, "mean"), a.mean((2, 3)))
    assert pool_channels(a, "none").shape == (4, 75)
    for pooling in ("mean", "max", "none"):
        h = torch.randn(pool_channels(a, pooling).shape[1], generator=gen)
        moved = a + 0.5 * lift_cav(h, a, pooling)
        if pooling != "max":  # moving along the lifted CAV moves the pooled activation by exactly 0.5 h
            assert torch.allclose(pool_channels(moved, pooling) - pool_channels(a, pooling), 0.5 * h.expand(4, -1),
                                  atol=1e-5)
        g = torch.randn_like(a)
        assert torch.allclose(pool_gradient(g, pooling) @ h, (g * lift_cav(h, a, pooling)).flatten(1).sum(1), atol=1e-4)
    with pytest.raises(ConfigError):
        pool_channels(a, "median")


def test_default_layer_is_the_last_conv_or_its_residual_block():
    x = torch.zeros(1, 1, 28, 28)
    assert default_concept_layer(build_builtin("mnist_cnn"), x) == "conv2"
    assert default_concept_layer(build_builtin("small_vgg"), x) == "features.7"
    assert default_concept_layer(build_builtin("small_resnet"), x) == "layer2.1"
    with pytest.raises(ConfigError):
        default_concept_layer(nn.Sequential(nn.Flatten(), nn.Linear(784, 2)), x)


def test_activations_are_copied_before_in_place_relus():
    torch.manual_seed(0)
    model = build_builtin("small_vgg").eval()  # features.7 conv is followed by an in-place ReLU
    x = torch.rand(6, 1, 28, 28)
    a = layer_activations(model, "features.7", x, batch_size=4)
    assert a.shape == (6, 32, 14, 14) and (a < 0).any()  # pre-ReLU values survived
    direct = model.features[:8](x)
    assert torch.allclose(a, direct, atol=1e-5)
    assert torch.allclose(pooled_activations(model, "features.7", x, "mean"), direct.mean((2, 3)), atol=1e-5)
    assert activation_change(model, "features.7", x, x).abs().max() == 0


def test_bad_inputs_raise_one_clear_error():
    a, t = _clusters(n=20)
    with pytest.raises(ConfigError):
        ConceptActivationVector("pca").fit(a, t)
    with pytest.raises(DataError):
        ConceptActivationVector().fit(a, torch.zeros(20, dtype=torch.bool))
    with pytest.raises(DataError):
        ConceptActivationVector().fit(a[:, :1].expand(20, 3).clone() * 0, t)  # zero CAV
    with pytest.raises(DataError):
        ConceptActivationVector().fit(a, t[:5])
    with pytest.raises(ConfigError):
        layer_activations(build_builtin("mnist_cnn"), "nope", torch.zeros(1, 1, 28, 28))
