"""Automatic layer choice (paper 000, Sec. 4.4) on built-ins and torchvision ResNet/VGG."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from hansgate.errors import ConfigError
from hansgate.nn.models import build_builtin
from hansgate.nn.surgery import auto_layers, capture_outputs, resolve_layers
from hansgate.refinement.egem import EgemConfig, ExposureMinimizer


@pytest.mark.parametrize(("name", "expected"), [
    ("mnist_cnn", ["pool1", "pool2", "relu3"]),  # the authors' hooks: inputs of conv2, fc1, fc2
    ("small_vgg", ["features.4", "features.9", "classifier.2"]),
    ("small_resnet", ["relu", "layer1", "layer2"]),
])
def test_builtin_choice(name, expected):
    assert auto_layers(build_builtin(name), torch.zeros(2, 1, 28, 28)) == expected


def test_torchvision_resnet_and_vgg_with_random_weights():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    resnet = torchvision.models.resnet18(num_classes=5).eval()
    assert auto_layers(resnet, x) == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    vgg = torchvision.models.vgg11(num_classes=5).eval()
    layers = auto_layers(vgg, x)
    pools = [f"features.{i}" for i, m in enumerate(vgg.features) if isinstance(m, nn.MaxPool2d)]
    assert layers == pools + ["classifier.1", "classifier.4"]  # every block's pool, then classifier ReLUs
    # PCA on ResNet; plain EGEM on VGG (its 4096-wide classifier makes a PCA basis slow to test)
    for model, pca in ((resnet, True), (vgg, False)):
        em = ExposureMinimizer(EgemConfig(pca=pca, batch_size=2)).fit(model, x)
        assert em.refine(model, alpha=0.5)(x).shape == (4, 5)
        if model is resnet:  # every stage feeds a conv or, through average pooling, the classifier
            assert not any(em.per_element_.values())


def test_inplace_relus_are_refined_and_statistics_see_post_activation_values():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).eval()
    x = torch.randn(16, 4)
    assert auto_layers(net, x) == ["1"]
    with torch.no_grad(), capture_outputs(net, ["1"]) as store:
        net(x)
        assert (store["1"] >= 0).all()
    em = ExposureMinimizer().fit(net, x)
    assert torch.all(em.moments_["1"].second >= 0)
    assert em.refine(net, alpha=0.3)(x).shape == (16, 2)


class _SharedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_module_running_twice_is_skipped_automatically_and_refused_explicitly():
    net = _SharedRelu().eval()
    x = torch.randn(2, 3)
    assert auto_layers(net, x) == []
    with pytest.raises(ConfigError, match="runs 2 times"):
        resolve_layers(net, x, ["relu"])
    with pytest.raises(ConfigError, match="no layer to refine"):
        resolve_layers(net, x, None)


def test_explicit_layers_by_name():
    net = build_builtin("mnist_cnn").eval()
    x = torch.rand(2, 1, 28, 28)
    assert resolve_layers(net, x, ["relu3"]) == ["relu3"]
    with pytest.raises(ConfigError, match="no module named"):
        resolve_layers(net, x, ["fc9"])


def test_model_that_does_not_run_gives_one_clear_error():
    from hansgate.errors import ModelRunError

    net = build_builtin("mnist_cnn").eval()
    wrong = torch.rand(2, 1, 12, 12)  # too small for the second conv
    with pytest.raises(ModelRunError, match="does not run"):
        resolve_layers(net, wrong, None)
    with pytest.raises(ModelRunError, match="does not run"):
        resolve_layers(net, wrong, ["relu3"])  # explicit names take the same path
