"""hansgate.nn.surgery on torchvision families: automatic layers, EGEM / PCA-EGEM mechanics, export parity.

Random-init models with 10 (or 4) classes at small inputs (32 px; the ViT is a small
``VisionTransformer`` with the torchvision layout): the refinement data are labelled with
the model's own predictions, so every sample is verified. The 224 px matrix is
``benchmarks/models_bench.py``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import VisionTransformer

from hansgate.nn.export import LOGIT_TOLERANCE, export_checked
from hansgate.nn.hooks import capture
from hansgate.nn.surgery import auto_layers, nonlinear_after, resolve_layers
from hansgate.refinement.egem import EgemConfig, ExposureMinimizer, select_alpha
from hansgate.refinement.pca import PcaExposure

EXPECTED = {
    "resnet18": ["maxpool", "layer1", "layer2", "layer3", "layer4"],
    "vgg11_bn": ["features.3", "features.7", "features.14", "features.21", "features.28", "classifier.1",
                 "classifier.4"],
    "mobilenet_v3_small": ["features.0.2", *(f"features.{i}" for i in range(1, 12)), "features.12.2",
                           "classifier.1"],
    "efficientnet_b0": ["features.0.2", *(f"features.{i}" for i in range(1, 8)), "features.8.2"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
}


def tiny_vit(num_layers: int = 2, hidden: int = 32, classes: int = 4) -> VisionTransformer:
    """torchvision's ViT layout at 32 px, patch 8: 17 tokens of ``hidden`` dims."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=num_layers, num_heads=2, hidden_dim=hidden,
                              mlp_dim=2 * hidden, num_classes=classes).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision inits the head to zero: logits all 0
    with torch.no_grad():  # centre the logits on random images, so that the predicted classes vary
        model.heads.head.bias -= model(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))).mean(0)
    return model


def recalibrated(model: torch.nn.Module, size: int = 32) -> torch.nn.Module:
    """Batch-norm running statistics from random images (cumulative average), then eval mode: random init
    with the default statistics (mean 0, var 1) lets activations vanish layer by layer (logits ~ 1e-10)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def own_labels(model: torch.nn.Module, n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_automatic_layers_per_torchvision_family(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32)
    assert auto_layers(model, x) == EXPECTED[arch]
    assert resolve_layers(model, x, None) == EXPECTED[arch]


def test_vit_encoder_blocks_are_refined_one_by_one():
    model = tiny_vit(num_layers=3)
    assert auto_layers(model, torch.rand(1, 3, 32, 32)) == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]


def test_egem_on_tokens_scales_each_embedding_dim_by_eq5():
    """EGEM on a ViT block: units are the D dims summed over tokens; the refined output is ``a * c`` per dim."""
    model = tiny_vit(hidden=128)  # 17 x 128 elements > max_element_units below: per dim, not per element
    x, _ = own_labels(model, 24)
    layer = "encoder.layers.encoder_layer_0"
    em = ExposureMinimizer(EgemConfig(layers=[layer], max_element_units=256)).fit(model, x)
    assert em.per_element_ == {layer: False}
    with capture(model, [layer]) as store, torch.no_grad():
        model(x)
        a = store[layer].pop().double()
    second = (a.sum(1) ** 2).mean(0)  # E[s_d^2], s = per-image sum over the tokens
    assert torch.allclose(em.variances_[layer], second, rtol=1e-6)
    lam = float(second.median())
    refined = em.refine(model, lambdas={layer: lam})
    with capture(refined, [layer]) as store, torch.no_grad():
        refined(x)
        b = store[layer].pop().double()
    c = second / (second + lam)
    assert torch.allclose(b, a * c, atol=1e-5)


def test_pca_egem_on_tokens_projects_the_token_sums():
    """PCA-EGEM on ``[N, T, D]``: the token sums become ``(s - mean) P + mean``, per image, by the linear
    rule at every token whatever ``conv_mode`` (signed sums near zero would make the ratio rule unstable)."""
    torch.manual_seed(0)
    a = torch.randn(5, 7, 4).abs()
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    factors = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)
    mean = a.sum(1).mean(0).double()
    module = PcaExposure(mean, basis, factors, spatial_size=4)
    out = module(a)
    proj = basis @ torch.diag(factors) @ basis.T
    expected = (a.sum(1).double() - mean) @ proj + mean
    assert out.shape == a.shape
    assert torch.allclose(out.sum(1).double(), expected, atol=1e-4)
    linear = PcaExposure(mean, basis, factors, spatial_size=999, conv_mode="linear")(a)  # T from the input
    torch.testing.assert_close(linear, out)
    pixel_mean = (mean / a.shape[1]).float()
    torch.testing.assert_close(out, (a - pixel_mean) @ proj.float() + pixel_mean)  # per token, closed form


@pytest.mark.parametrize("arch,pca", [("mobilenet_v3_small", False), ("vit", False), ("vit", True)])
def test_egem_and_pca_egem_refine_each_family_and_export(arch, pca):
    """select_alpha end to end on own-labelled data (all verified), then export parity of the refined model.

    With fewer fit samples than units, PCA-EGEM removes every direction they do not span
    (Sec. 3.2), which can flip a random model's near-tied predictions: whether the slack rule
    qualified is recorded, and a qualified choice must meet it.
    """
    if arch == "vit":
        model = tiny_vit()
    else:
        torch.manual_seed(0)
        model = recalibrated(torchvision.models.get_model(arch, weights=None, num_classes=10))
    x, y = own_labels(model, 30)
    assert len(set(y.tolist())) > 1  # the model separates the samples: no comparison below is vacuous
    sel = select_alpha(model, x, y, EgemConfig(pca=pca, repetitions=1, alpha_grid=(0.2, 1.0)))
    assert sel.minimizer.layers_ == auto_layers(model, x[:1])
    assert [c.params["alpha"] for c in sel.selection.candidates] == [0.2, 1.0]
    assert sel.selection.original_val_acc == 1.0  # labelled with its own predictions
    if sel.selection.qualified:
        assert sel.selection.chosen.val_acc >= sel.selection.threshold
    _, diff = export_checked(sel.model, x[:4], ["logits"])
    assert diff <= LOGIT_TOLERANCE


def test_nonlinear_after_tells_a_linear_head():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert nonlinear_after(model, "0")
    assert not nonlinear_after(model, "1")  # average pooling, flattening and a linear layer: affine
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    assert nonlinear_after(resnet, "layer4.0") and not nonlinear_after(resnet, "layer4.1")
