"""Attributions on tiny seeded models: closed forms, conservation, canonizers undone, the F.1 rule."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from torch import nn
from zennit.torchvision import ResNetCanonizer

from hansgate.audit.attributions import (
    ATTRIBUTION_METHODS,
    AttributionConfig,
    attribute,
    canonizers_for,
    explain,
    heatmap_grid_png,
    relevance_share_in_mask,
    verify_by_relevance,
)
from hansgate.errors import ConfigError
from hansgate.nn.models import build_builtin


def _bias_free_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3, bias=False)).eval()


def test_gradient_is_autograd_gradient_of_target_logit():
    model = _bias_free_cnn()
    x = torch.rand(5, 1, 8, 8)
    t = torch.tensor([0, 1, 2, 0, 1])
    got = attribute(model, x, t, "gradient")
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr).gather(1, t[:, None]).sum(), xr)
    torch.testing.assert_close(got, grad)


def test_integrated_gradients_completeness():
    model = _bias_free_cnn()
    x = torch.rand(3, 1, 8, 8)
    t = torch.tensor([0, 1, 2])
    rel = attribute(model, x, t, "integrated-gradients", AttributionConfig(ig_steps=100))
    # baseline = per-feature minimum of the value range (0): sum of attributions = f(x) - f(0)
    diff = model(x).gather(1, t[:, None]).squeeze(1) - model(torch.zeros_like(x)).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(rel.sum((1, 2, 3)), diff.detach(), rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("method", ["lrp-epsilon-plus-flat", "lrp-epsilon-zplus-box"])
def test_lrp_conserves_the_target_logit_without_biases(method):
    model = _bias_free_cnn()
    x = torch.rand(4, 1, 8, 8) + 0.05
    logits = model(x)
    t = logits.argmax(1)
    rel = attribute(model, x, t, method)
    target = logits.gather(1, t[:, None]).squeeze(1).detach()
    torch.testing.assert_close(rel.sum((1, 2, 3)), target, rtol=1e-3, atol=1e-4)


def test_every_method_runs_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = build_builtin("small_resnet").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 1, 28, 28)
    before = model(x)
    for method in ATTRIBUTION_METHODS:
        rel = attribute(model, x, torch.tensor([1]), method, AttributionConfig(smoothgrad_samples=3, ig_steps=4))
        assert rel.shape == x.shape and torch.isfinite(rel).all()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])  # canonizers (merged batch-norm) undone
    torch.testing.assert_close(model(x), before)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_canonizers_chosen_from_architecture():
    assert any(isinstance(c, ResNetCanonizer) for c in canonizers_for(build_builtin("small_resnet")))
    assert canonizers_for(build_builtin("small_vgg")) == []


def test_resnet_lrp_with_canonizer_conserves_and_without_does_not():
    """The ResNet canonizer turns the skip sum into a module LRP splits: with zero biases (batch-norm
    without shift) the map sums to the logit; the same composite without canonizer does not."""
    from zennit.attribution import Gradient

    from hansgate.audit.attributions import EpsilonZPlusBox

    torch.manual_seed(1)
    model = build_builtin("small_resnet").eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.zeros_(m.bias)
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    x = torch.rand(3, 1, 28, 28) + 0.05
    logits = model(x).detach()
    t = logits.argmax(1)
    target = logits.gather(1, t[:, None]).squeeze(1)
    rel = attribute(model, x, t, "lrp-epsilon-zplus-box")
    torch.testing.assert_close(rel.sum((1, 2, 3)), target, rtol=1e-3, atol=1e-5)
    plain = EpsilonZPlusBox(low=torch.zeros_like(x[:1]), high=torch.ones_like(x[:1]), canonizers=[])
    with Gradient(model, plain) as attributor:
        _, rel_plain = attributor(x.clone().requires_grad_(True),
                                  lambda out: torch.nn.functional.one_hot(t, out.shape[1]) * out)
    assert ((rel_plain.sum((1, 2, 3)) - target).abs() > 0.5 * target.abs()).all()


def test_smoothgrad_is_seeded_and_keeps_caller_rng():
    model = _bias_free_cnn()
    x = torch.rand(2, 1, 8, 8)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = attribute(model, x, torch.tensor([0, 1]), "smoothgrad", AttributionConfig(smoothgrad_samples=5))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = attribute(model, x, torch.tensor([0, 1]), "smoothgrad", AttributionConfig(smoothgrad_samples=5))
    torch.testing.assert_close(a, b)


def test_relevance_share_closed_form_and_rule():
    rel = torch.zeros(3, 1, 4, 4)
    rel[0, 0, 0, 0], rel[0, 0, 3, 3] = 3.0, -1.0  # 3 of 4 inside
    rel[1, 0, 3, 3] = 2.0  # none inside
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1
    share = relevance_share_in_mask(rel, mask)
    torch.testing.assert_close(share, torch.tensor([0.75, 0.0, 0.0]))
    assert verify_by_relevance(rel, mask).tolist() == [True, False, False]
    assert verify_by_relevance(rel, mask, 0.8).tolist() == [False, False, False]
    with pytest.raises(ConfigError):
        verify_by_relevance(rel, mask, 0.0)


def test_unknown_method_and_missing_target_are_config_errors():
    with pytest.raises(ConfigError):
        attribute(_bias_free_cnn(), torch.rand(1, 1, 8, 8), torch.tensor([0]), "lime")
    with pytest.raises(ConfigError):
        attribute(_bias_free_cnn(), torch.rand(1, 1, 8, 8))


def test_heatmap_grid_is_a_png():
    png = base64.b64decode(heatmap_grid_png([[np.random.rand(8, 8)]], ["r"], ["c"], images=[np.zeros((8, 8))]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_verified_indices_select_correct_samples_with_relevance_in_the_region():
    """A linear scorer that looks only at the left half: every correct sample is verified with the
    left-half mask, none with the right-half mask."""
    from hansgate.audit.attributions import verified_indices

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)).eval()
    w = torch.zeros(2, 1, 4, 4)
    w[0, 0, :, :2], w[1, 0, :, :2] = 1.0, -1.0
    with torch.no_grad():
        model[1].weight.copy_(w.flatten(1))
    x = torch.rand(12, 1, 4, 4)
    y = torch.tensor([0] * 6 + [1] * 6)  # class 1 is never predicted for positive inputs
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    idx = verified_indices(model, x, y, left)
    assert idx.tolist() == list(range(6))
    assert verified_indices(model, x, y, 1 - left).tolist() == []


def test_canonizers_per_torchvision_family():
    """ResNet canonizer, VGG canonizer, merged batch-norm for the rest (issue 12)."""
    import torchvision
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import VGGCanonizer

    torch.manual_seed(0)
    build = lambda arch: torchvision.models.get_model(arch, weights=None, num_classes=10)  # noqa: E731
    assert [type(c) for c in canonizers_for(build("resnet18"))] == [ResNetCanonizer]
    assert [type(c) for c in canonizers_for(build("vgg11_bn"))] == [VGGCanonizer]
    for arch in ("mobilenet_v3_small", "efficientnet_b0"):
        assert [type(c) for c in canonizers_for(build(arch))] == [SequentialMergeBatchNorm]


def test_lrp_on_attention_falls_back_to_the_gradient_and_says_so():
    """zennit passes relevance through attention unchanged: an LRP method on a ViT runs the fallback, the
    note says why, and the relevance is exactly the fallback's."""
    from torchvision.models import VisionTransformer

    from hansgate.audit.attributions import lrp_note, method_for

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3).eval()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision inits the head to zero (all gradients 0)
    x = torch.rand(2, 3, 32, 32)
    target = torch.tensor([0, 2])
    sound, note = lrp_note(vit)
    assert not sound and "attention" in note and "layer normalisation" in note
    used, why = method_for(vit, "lrp-epsilon-plus-flat")
    assert used == "gradient" and "replaced by gradient" in why
    out = explain(vit, x, target, "lrp-epsilon-zplus-box")
    assert (out.requested, out.method) == ("lrp-epsilon-zplus-box", "gradient") and out.note == method_for(
        vit, "lrp-epsilon-zplus-box")[1]
    torch.testing.assert_close(out.relevance, attribute(vit, x, target, "gradient"))
    assert out.relevance.abs().sum() > 0
    ig = AttributionConfig(lrp_fallback="integrated-gradients", ig_steps=4)
    assert explain(vit, x, target, "lrp-epsilon-plus-flat", ig).method == "integrated-gradients"
    assert method_for(vit, "smoothgrad") == ("smoothgrad", None)  # gradient methods are asked as they are
    with pytest.raises(ConfigError, match="gradient method"):
        method_for(vit, "lrp-epsilon-plus-flat", AttributionConfig(lrp_fallback="lrp-epsilon-plus-flat"))


def test_lrp_notes_per_family():
    torch.manual_seed(0)
    assert lrp_note_of("resnet18") == (True, None) and lrp_note_of("vgg11_bn") == (True, None)
    sound, note = lrp_note_of("mobilenet_v3_small")
    assert sound and "skip sums" in note and "squeeze-excitation" in note
    assert not lrp_note_of("convnext_tiny")[0]  # layer normalisation
    # an LRP run on a plain CNN is LRP (no note, nothing replaced)
    assert explain(build_builtin("small_vgg"), torch.rand(1, 1, 28, 28), torch.tensor([1])).note is None


def lrp_note_of(arch: str) -> tuple[bool, str | None]:
    import torchvision

    from hansgate.audit.attributions import lrp_note

    return lrp_note(torchvision.models.get_model(arch, weights=None, num_classes=10))


def test_attributions_do_not_depend_on_the_batch(monkeypatch):
    """The default batch follows ``nn.training.gradient_batch_size``; maps are the same at any batch."""
    from hansgate.nn import training

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x, y = torch.rand(10, 3, 8, 8), torch.randint(0, 5, (10,))
    whole = attribute(model, x, y, "lrp-epsilon-zplus-box", AttributionConfig(batch_size=10))
    monkeypatch.setattr(training, "GRADIENT_VALUES", 3 * 8 * 8 * 3)  # 3 images per pass
    assert training.gradient_batch_size(3 * 8 * 8) == 3
    torch.testing.assert_close(attribute(model, x, y, "lrp-epsilon-zplus-box"), whole, rtol=1e-5, atol=1e-6)
