"""hansgate.refinement.concept_heads: graph split, heads vs autograd in torch and onnxruntime, manifest, demo bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hansgate.concepts.cav import default_concept_layer
from hansgate.errors import ConfigError, ExportError
from hansgate.nn.models import build_builtin
from hansgate.nn.training import TrainConfig, train_classifier
from hansgate.refinement.concept_heads import (
    SENSITIVITY_TOLERANCE,
    ConceptHeads,
    default_watch_layer,
    presence_threshold,
    split_at,
    watch_concept,
)

OUTPUTS = ["logits", "concept_scores", "concept_sensitivity"]


@pytest.fixture(scope="module")
def trained(digits_data):
    """A small trained mnist_cnn on 600 biased training images (1 epoch): real activations, quick."""
    torch.manual_seed(0)
    model = build_builtin("mnist_cnn")
    idx = torch.randperm(len(digits_data.y_train), generator=torch.Generator().manual_seed(0))[:600]
    return train_classifier(model, digits_data.x_train[idx], digits_data.y_train[idx], TrainConfig(epochs=1))


@pytest.fixture(scope="module")
def watched(trained, digits_data):
    from hansgate.data.artifacts import get_artifact

    x = digits_data.x_refine[:200]
    y = digits_data.y_refine[:200]
    return [watch_concept(trained, name, x, get_artifact(name).apply(x), x, y, digits_data.classes, pooling="mean")
            for name in ("corner", "frame")]


@pytest.mark.parametrize("name,layer", [("mnist_cnn", "conv2"), ("small_vgg", "features.7"),
                                        ("small_resnet", "layer2.1"), ("small_resnet", "layer1")])
def test_split_reproduces_the_model_and_shares_its_parameters(name, layer):
    torch.manual_seed(0)
    model = build_builtin(name).eval()
    x = torch.rand(3, 1, 28, 28)
    features, head = split_at(model, layer)
    assert torch.allclose(head(features(x)), model(x), atol=1e-6)
    assert {id(p) for p in head.parameters()} <= {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name,pooled,full_map", [("small_vgg", "features.7", "features.9"),
                                                  ("mnist_cnn", "conv2", "pool2"),
                                                  ("small_resnet", "layer2.0", "layer2.0")])
def test_default_watch_layer_moves_full_map_concepts_past_the_closing_max_pool(name, pooled, full_map):
    model = build_builtin(name)
    x = torch.rand(1, 1, 28, 28)
    assert default_watch_layer(model, x, "mean") == pooled
    assert default_watch_layer(model, x, "none") == full_map
    # the last block of a ResNet is followed only by average pooling and the linear head: skipped
    assert (pooled == default_concept_layer(model, x)) == (name != "small_resnet")


def test_watch_layer_has_a_nonlinearity_before_the_logits_and_says_why(digits_data):
    """Issue 12: at a layer followed only by linear ops TCAV is constant; the automatic choice avoids it,
    a named one warns, and the manifest's layer_reason records either."""
    from hansgate.data.artifacts import get_artifact
    from hansgate.refinement.concept_heads import ConstantTcavWarning, watch_layer

    torch.manual_seed(0)
    model = build_builtin("small_resnet").eval()
    x, y = digits_data.x_refine[:40], digits_data.y_refine[:40]
    layer, reason = watch_layer(model, x[:1], "mean")
    assert layer == "layer2.0" and reason.startswith("automatic") and "layer2.1" in reason
    auto = watch_concept(model, "corner", x, get_artifact("corner").apply(x), x, y, digits_data.classes)
    assert auto.layer == "layer2.0" and auto.layer_reason == reason
    assert ConceptHeads([auto]).specs()[0].layer_reason == reason
    with pytest.warns(ConstantTcavWarning, match="TCAV is constant"):
        named = watch_concept(model, "corner", x, get_artifact("corner").apply(x), x, y, digits_data.classes,
                              layer="layer2.1")
    assert "warning" in named.layer_reason and named.layer == "layer2.1"
    # the warning is true: the directional derivative along the CAV has one sign per class
    heads = ConceptHeads([named])
    sens = heads.reference_sensitivity(model, x)[:, 0]
    assert bool(((sens > 0).all(0) | (sens <= 0).all(0)).all())
    fine = watch_concept(model, "corner", x, get_artifact("corner").apply(x), x, y, digits_data.classes,
                         layer="layer2.0")
    assert fine.layer_reason.startswith("named by the caller") and "warning" not in fine.layer_reason


def test_split_refuses_a_layer_inside_a_residual_block():
    model = build_builtin("small_resnet").eval()
    with pytest.raises(ConfigError, match="not a cut"):
        split_at(model, "layer2.1.conv1")
    with pytest.raises(ConfigError):
        split_at(model, "nope")


def test_watched_concept_records_baselines(watched, digits_data):
    c = watched[0]
    assert c.layer == "conv2" and c.pooling == "mean" and abs(float(c.cav.norm()) - 1) < 1e-5
    assert set(c.baseline_tcav) <= set(digits_data.classes) and all(0 <= v <= 1 for v in c.baseline_tcav.values())
    spec = ConceptHeads(watched).specs()[0]
    assert spec.name == "corner" and spec.presence_threshold == c.presence_threshold
    assert spec.sensitivity_tolerance == SENSITIVITY_TOLERANCE["jvp"] and spec.sensitivity_method == "jvp"


@pytest.mark.parametrize("scheme", ["jvp", "central", "forward"])
def test_torch_graph_matches_model_scores_and_autograd(trained, watched, digits_data, scheme):
    heads = ConceptHeads(watched, scheme=scheme)
    graph = heads.graph(trained)
    x = digits_data.x_test[:64]
    with torch.no_grad():
        logits, scores, sens = graph(x)
    assert torch.allclose(logits, trained(x), atol=1e-5)
    from hansgate.concepts.cav import layer_activations

    pooled = layer_activations(trained, "conv2", x).mean((2, 3))
    expected = torch.stack([(pooled - c.center) @ c.cav for c in watched], 1)
    assert torch.allclose(scores, expected, atol=1e-4)
    ref = heads.reference_sensitivity(trained, x)
    assert sens.shape == ref.shape == (64, 2, 10)
    assert (sens - ref).abs().max() <= heads.tolerance * (1 + ref.abs().max())


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_onnx_sensitivity_matches_autograd_on_real_samples(trained, digits_data, pooling):
    """The stated tolerance: |s_onnx - s_autograd| <= 1e-4 (1 + max |s|) per concept (exact JVP), 128 test images."""
    from hansgate.data.artifacts import get_artifact
    from hansgate.nn.export import export_onnx, run_onnx

    xr, yr = digits_data.x_refine[:200], digits_data.y_refine[:200]
    watched = [watch_concept(trained, name, xr, get_artifact(name).apply(xr), xr, yr, digits_data.classes,
                             pooling=pooling) for name in ("corner", "frame")]
    heads = ConceptHeads(watched)
    x = digits_data.x_test[:128]
    onnx_bytes = export_onnx(heads.graph(trained), x, OUTPUTS)
    assert heads.scheme_ == "jvp" and heads.tolerance == SENSITIVITY_TOLERANCE["jvp"] == 1e-4
    errors = heads.check(onnx_bytes, trained, x)  # raises ExportError past the tolerance
    assert all(e["relative_error"] <= 1e-4 for e in errors.values())
    logits, scores, sens = run_onnx(onnx_bytes, x.numpy())
    np.testing.assert_allclose(logits, trained(x).detach().numpy(), atol=1e-4)
    assert scores.shape == (128, 2) and sens.shape == (128, 2, 10)


def test_check_refuses_a_graph_that_disagrees_with_autograd(trained, watched, digits_data):
    import copy

    from hansgate.nn.export import export_onnx

    heads = ConceptHeads(watched)
    x = digits_data.x_test[:64]
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.fc1.weight.mul_(1.5)  # the graph of another model: logits and sensitivities differ
    with pytest.raises(ExportError, match="differs from autograd"):
        heads.check(export_onnx(heads.graph(other), x, OUTPUTS), trained, x)


def test_heads_fall_back_to_central_differences_without_derivative_rules(digits_data):
    """A head op refinement.jvp has no rule for (GELU): finite differences, their looser tolerance, on record."""
    from hansgate.nn.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 26 * 26, 10)).eval()
    xr, yr = digits_data.x_refine[:60], digits_data.y_refine[:60]
    from hansgate.data.artifacts import get_artifact

    wc = watch_concept(model, "corner", xr, get_artifact("corner").apply(xr), xr, yr, digits_data.classes, layer="0")
    heads = ConceptHeads([wc])
    onnx_bytes = export_onnx(heads.graph(model), xr, OUTPUTS)
    assert heads.scheme_ == "central" and heads.tolerance == SENSITIVITY_TOLERANCE["central"]
    assert heads.specs()[0].sensitivity_method == "central"
    heads.check(onnx_bytes, model, xr)


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30), st.lists(st.floats(-5, 5), min_size=2, max_size=30))
@settings(max_examples=40, deadline=None)
def test_presence_threshold_maximises_balanced_accuracy(clean, concept):
    c, k = torch.tensor(clean), torch.tensor(concept)
    thr = presence_threshold(c, k)

    def bal(t: float) -> float:
        return 0.5 * ((c <= t).float().mean() + (k > t).float().mean()).item()

    candidates = [float(v) for v in torch.cat([c, k])] + [min(clean + concept) - 1]
    assert bal(thr) >= max(bal(t) for t in candidates) - 1e-6  # float32 means in bal()


def test_presence_threshold_separates_separable_scores():
    thr = presence_threshold(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 6.0]))
    assert 2.0 < thr < 5.0


def test_heads_validate_their_concepts(watched):
    import dataclasses

    with pytest.raises(ConfigError):
        ConceptHeads([])
    with pytest.raises(ConfigError):
        ConceptHeads([watched[0], dataclasses.replace(watched[1], layer="conv1")])
    with pytest.raises(ConfigError):
        ConceptHeads([watched[0], watched[0]])


def test_demo_bundle_carries_the_artifact_heads(demo_bundle, demo_dir):
    from hansgate.bundle import load_bundle
    from hansgate.nn.export import run_onnx

    bundle = load_bundle(demo_bundle)
    (concept,) = bundle.manifest.concepts
    assert concept.name == "corner" and concept.layer == "features.9" and concept.cav_kind == "signal"
    assert concept.pooling == "none"
    assert set(concept.baseline_tcav) == set(bundle.manifest.classes)
    with np.load(demo_dir / "data" / "test.npz") as z:
        x = z["x"][:100]
    with np.load(demo_dir / "data" / "test_poisoned.npz") as z:
        xp = z["x"][:100]
    _, scores, sens = run_onnx(bundle.onnx_path.read_bytes(), x)
    _, scores_p, _ = run_onnx(bundle.onnx_path.read_bytes(), xp)
    assert sens.shape == (100, 1, 10)
    present_clean = (scores[:, 0] > concept.presence_threshold).mean()
    present_poisoned = (scores_p[:, 0] > concept.presence_threshold).mean()
    assert present_poisoned > 0.9 and present_clean < 0.1  # the head sees the artifact in traffic


def test_watching_and_graphs_leave_the_callers_model_and_mode_alone(digits_data):
    torch.manual_seed(0)
    model = build_builtin("small_resnet").train()  # batch norm: train mode would change its statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits_data.x_refine[:40], digits_data.y_refine[:40]
    from hansgate.data.artifacts import get_artifact

    wc = watch_concept(model, "corner", x, get_artifact("corner").apply(x), x, y, digits_data.classes,
                       pooling="mean")
    graph = ConceptHeads([wc]).graph(model)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not graph.training and all(p is not q for p, q in zip(graph.parameters(), model.parameters()))
