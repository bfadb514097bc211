"""The torch sections one by one, on a tiny conv model: when they skip, what they measure, their layout."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hansgate.audit.artifact_tests import resolve_artifacts
from hansgate.audit.attributions import ATTRIBUTION_METHODS, AttributionConfig, attribute
from hansgate.audit.config import AuditConfig
from hansgate.audit.explain import (
    AttributionSection,
    artifacts_section,
    attributions_section,
    concepts_section,
    influence_section,
    sample_indices,
)
from hansgate.audit.roles import torch_predictor
from hansgate.audit.sections import Predictions, Skipped, predictions_section
from hansgate.manifest import InputSpec

SPEC = InputSpec(channels=1, height=12, width=12, mean=[0.5], std=[0.25])
CLASSES = ["a", "b"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 144, 2)).eval()


def _data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 12, 12, generator=gen) * 0.5, torch.arange(n) % 2


def _predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Predictions:
    return predictions_section({"before": torch_predictor(model, SPEC)}, x.numpy(), y.numpy())


def test_sample_indices_are_seeded_sorted_and_distinct():
    a = sample_indices(100, 10, seed=3)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10
    assert np.array_equal(a, sample_indices(100, 10, seed=3)) and not np.array_equal(a, sample_indices(100, 10, 4))
    assert sample_indices(5, 10, 0).tolist() == [0, 1, 2, 3, 4]


def test_attributions_skip_without_a_torch_model_or_heatmaps():
    x, y = _data()
    pred = _predictions(_model(), x, y)
    assert attributions_section(x, y, CLASSES, pred, {}, SPEC, AuditConfig()) == \
        Skipped("no torch model (source weights not found)")
    assert isinstance(attributions_section(x, y, CLASSES, pred, {"before": _model()}, SPEC,
                                           AuditConfig(heatmaps=0)), Skipped)


def test_attributions_follow_the_verification_rule_and_explain_the_predicted_class():
    model = _model()
    x, y = _data()
    pred = _predictions(model, x, y)
    cfg = AuditConfig(heatmaps=6, seed=0)
    mask = torch.zeros(12, 12)
    mask[:, :6] = 1.0  # the left half
    sec = attributions_section(x, y, CLASSES, pred, {"before": model}, SPEC, cfg, mask, "left.npy")
    assert isinstance(sec, AttributionSection)
    idx = sample_indices(len(y), 6, 0)
    assert [s.index for s in sec.samples] == idx.tolist()
    # the heatmap is LRP of the predicted class on normalised inputs, and the share is computed from it
    xs = (x[torch.as_tensor(idx)] - 0.5) / 0.25
    target = model(xs).argmax(1)
    rel = attribute(model, xs, target, cfg.lrp_method, AttributionConfig(value_range=(0.0, 1.0), seed=0))
    np.testing.assert_allclose(sec.heatmaps.rows["before"], rel.sum(1).numpy()[:8], rtol=1e-5, atol=1e-7)
    r = rel.abs().sum(1)
    share = (r[:, :, :6].flatten(1).sum(1) / r.flatten(1).sum(1)).numpy()
    np.testing.assert_allclose([s.region_share["before"] for s in sec.samples], share, rtol=1e-5)
    assert [s.verified["before"] for s in sec.samples] == (share >= 0.75).tolist()
    assert sec.verified_share()["before"] == float(np.mean(share >= 0.75))
    assert [s.predicted["before"] for s in sec.samples] == [CLASSES[int(pred.predicted["before"][i])] for i in idx]
    d = sec.as_dict()
    assert d["region_mask"] == "left.npy" and d["methods"] == list(ATTRIBUTION_METHODS)
    assert set(sec.methods.rows) == set(ATTRIBUTION_METHODS) and sec.methods.images.shape == (4, 12, 12)
    # without a mask the samples carry no verification fields
    plain = attributions_section(x, y, CLASSES, pred, {"before": model}, SPEC, cfg)
    assert isinstance(plain, AttributionSection) and "verified_share" not in plain.as_dict()
    assert "region_share" not in plain.as_dict()["samples"][0]  # type: ignore[index]


def test_artifact_section_pastes_on_raw_pixels_and_normalises_for_torch():
    model = _model()
    x, y = _data()
    pred = _predictions(model, x, y)
    arts = resolve_artifacts(["corner"])
    predictors = {"before": torch_predictor(model, SPEC)}
    res = artifacts_section(predictors, {"before": model, "source": model}, x, y, CLASSES, pred, arts, SPEC,
                            AuditConfig(heatmaps=4))
    row = res.artifacts["corner"].models["before"]
    # the flip rate by hand: the model on normalised clean vs pasted images
    xp = arts[0].apply(x)
    flips = (model((x - 0.5) / 0.25).argmax(1) != model((xp - 0.5) / 0.25).argmax(1)).float().mean()
    assert row.flip_rate == float(flips) and row.relevance_share_n == 4
    assert set(res.artifacts["corner"].models) == {"before"}  # only roles that predict are tested


def test_concepts_and_influence_say_why_they_skip():
    x, y = _data()
    arts = resolve_artifacts(["corner"])
    assert concepts_section({}, x, y, CLASSES, {}, arts, SPEC, AuditConfig()) == Skipped("no torch model")
    assert concepts_section({"before": _model()}, x, y, CLASSES, {}, arts, SPEC,
                            AuditConfig(concepts=False)) == Skipped("disabled")
    assert influence_section({"before": _model()}, x, y, None, None, None, arts, SPEC, AuditConfig()) == \
        Skipped("no training data given (--train-data)")
    assert influence_section({}, x, y, x, y, None, arts, SPEC, AuditConfig()) == Skipped("no torch model")
    assert influence_section({"before": _model()}, x, y, x, y, None, arts, SPEC,
                             AuditConfig(influence=False)) == Skipped("disabled")
