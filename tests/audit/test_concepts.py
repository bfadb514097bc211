"""Concept evidence: the a.h projection and the per-class ranking agree with audit.tcav on a tiny model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hansgate.audit.concepts import CavProjection, concept_evidence, concept_sets
from hansgate.audit.tcav import ConceptRanking, TcavConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6 * 8 * 8, 3)).eval()


def test_cav_projection_is_activation_dot_cav_summed_over_positions():
    model = _model()
    x = torch.rand(5, 1, 8, 8)
    h = torch.randn(6)
    got = CavProjection(model, "2", h)(x)
    a = model[:3](x)  # pre-ReLU output of the second conv
    want = (a * h.view(1, -1, 1, 1)).sum((1, 2, 3))[:, None]
    torch.testing.assert_close(got, want)
    assert not model[2]._forward_hooks and not model[3]._forward_hooks


def test_evidence_ranking_equals_concept_ranking():
    model = _model()
    torch.manual_seed(1)
    x = torch.rand(60, 1, 8, 8)
    y = model(x).argmax(1)
    x_with = x.clone()
    x_with[:, :, :2, :2] = 1.0
    attrs = {"group": np.where(np.arange(60) % 2 == 0, "even", "odd")}
    sets = concept_sets(x, attrs, {"patch": x_with}, {"patch": np.arange(60)})
    assert set(sets) == {"artifact:patch", "group=even", "group=odd"}
    cfg = TcavConfig(runs=4, seed=0)
    classes = ["a", "b", "c"]
    ev = concept_evidence(model, x, y, classes, sets, cfg, localise=["artifact:patch"], n_localise=2)
    assert ev.layer == "2"
    for c, name in enumerate(classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) < 2:
            assert name not in ev.per_class
            continue
        ref = ConceptRanking(cfg).fit(model, "2", x[idx], c, sets).as_dict()
        assert ev.per_class[name].ranking == ref["ranking"]
        for k in sets:
            assert ev.per_class[name].results[k].mean == ref["results"][k]["mean"]
            assert ev.per_class[name].results[k].p_value == ref["results"][k]["p_value"]
    loc = ev.localisation["artifact:patch"]
    assert loc.heatmaps.shape == (2, 8, 8) and np.isfinite(loc.heatmaps).all()
    torch.testing.assert_close(torch.from_numpy(loc.images), sets["artifact:patch"][0][:2, 0])
    d = ev.as_dict()
    assert set(d) == {"layer", "config", "per_class"} and d["config"]["runs"] == 4
