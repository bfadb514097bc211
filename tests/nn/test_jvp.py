"""hansgate.nn.jvp: forward-mode directional derivatives agree with autograd's JVP on tiny and built-in heads."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hansgate.concepts.cav import lift_cav
from hansgate.nn.jvp import Linearized, UnsupportedOp, linearizable
from hansgate.nn.models import build_builtin
from hansgate.nn.surgery import split_at


def reference_jvp(head: nn.Module, a: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``[N, M, K]`` by autograd (``torch.autograd.functional.jvp``), one direction at a time."""
    outs = []
    for t in tangents:
        _, d = torch.autograd.functional.jvp(lambda z: head(z * 1.0), a, t.expand_as(a).contiguous())
        outs.append(d)
    return torch.stack(outs, 1)


@lru_cache(maxsize=None)
def split_builtin(name: str, layer: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return split_at(build_builtin(name).eval(), layer)


@pytest.mark.parametrize("window_pools", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "none"])
@pytest.mark.parametrize("name,layer", [("mnist_cnn", "conv2"), ("mnist_cnn", "conv1"), ("small_vgg", "features.7"),
                                        ("small_vgg", "features.2"), ("small_resnet", "layer1"),
                                        ("small_resnet", "layer2.1")])
def test_builtin_heads_match_autograd(name, layer, pooling, window_pools):
    features, head = split_builtin(name, layer)
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        a = features(x)
        gen = torch.Generator().manual_seed(1)
        d = a[0].numel() if pooling == "none" else a.shape[1]
        directions = torch.stack([lift_cav(torch.randn(d, generator=gen), a, pooling)[0] for _ in range(3)])
        out, sens = Linearized(head, window_pools=window_pools)(a, directions)
        assert torch.equal(out, head(a.clone()))
    ref = reference_jvp(head, a, directions.unsqueeze(1))
    assert sens.shape == ref.shape == (6, 3, 10)
    assert torch.allclose(sens, ref, rtol=1e-5, atol=1e-6 * (1 + float(ref.abs().max())))


@given(m=st.integers(1, 4), n=st.integers(1, 5), seed=st.integers(0, 2**16), window_pools=st.booleans())
@settings(max_examples=25, deadline=None)
def test_per_sample_tangents_match_autograd(m, n, seed, window_pools):
    """Directions that differ per sample ``[M, N, ...]`` take the general (unmasked) rules."""
    features, head = split_builtin("small_vgg", "features.7")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a = features(torch.rand(n, 1, 28, 28, generator=gen))
        t = torch.randn((m,) + tuple(a.shape), generator=gen)
        _, sens = Linearized(head, window_pools=window_pools)(a, t)
    assert torch.allclose(sens, reference_jvp(head, a, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window_pools", [False, True])
@pytest.mark.parametrize("constant", [True, False])
def test_max_pool_ties_follow_torch_first_maximum(window_pools, constant):
    """Exact ties of positive values inside pooling windows: the tangent of the first maximum, as autograd."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    a = torch.randint(-2, 3, (4, 3, 8, 8)).float()  # many equal maxima per 2x2 window
    if constant:  # one offset per channel (a channel-pooled CAV)
        t = torch.randn(2, 1, 3, 1, 1)
    else:
        t = torch.randn(2, 1, 3, 8, 8)
    _, sens = Linearized(head, window_pools=window_pools)(a, t)
    ref = torch.stack([torch.autograd.functional.jvp(head, a, ti.expand_as(a))[1] for ti in t], 1)
    assert torch.allclose(sens, ref, atol=1e-6)


class _Branchy(nn.Module):
    """Every rule outside ReLU / max-pool / linear: batch norm, sigmoid, tanh, average pools, +, -, *, view."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.sig, self.tanh = nn.Sigmoid(), nn.Tanh()
        self.fc = nn.Linear(16, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        b = self.bn(a)
        c = self.sig(self.conv(b)) * torch.tanh(b) - 0.5 * b
        d = torch.relu(c + self.tanh(a)) + torch.sigmoid(a)
        e = self.gap(self.avg(d))
        return self.fc(self.drop(e.view(e.size(0), -1))) * 2.0


def test_branchy_head_matches_autograd():
    torch.manual_seed(0)
    head = _Branchy()
    head.bn.running_mean.uniform_(-1, 1)
    head.bn.running_var.uniform_(0.5, 2)
    head.eval()
    a = torch.randn(5, 4, 8, 8)
    t = torch.randn(3, 1, 4, 8, 8)
    out, sens = Linearized(head)(a, t)
    assert torch.allclose(out, head(a), atol=1e-6)
    assert torch.allclose(sens, reference_jvp(head, a, t), atol=1e-5)


def test_dropout_in_training_uses_the_value_mask_for_the_tangent():
    """RR-ClArC trains the head with dropout on: value and derivative see the same mask."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    a, t = torch.randn(10, 6), torch.randn(1, 6)
    torch.manual_seed(7)
    out, sens = Linearized(head)(a, t)
    torch.manual_seed(7)
    ref_out, ref = torch.autograd.functional.jvp(head, a, t.expand_as(a))
    assert torch.allclose(out, ref_out) and torch.allclose(sens[:, 0], ref, atol=1e-6)


def test_unknown_ops_are_refused_so_callers_can_fall_back():
    assert not linearizable(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)))
    with pytest.raises(UnsupportedOp, match="GELU"):
        Linearized(nn.Sequential(nn.Linear(4, 4), nn.GELU()))

    class Cat(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, a], 1)

    with pytest.raises(UnsupportedOp):
        Linearized(Cat())

    class MixBatch(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a.reshape(-1)

    with pytest.raises(UnsupportedOp, match="batch dimension"):
        Linearized(MixBatch())(torch.randn(3, 4), torch.randn(1, 4))


def test_batch_norm_in_training_mode_is_refused():
    head = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(UnsupportedOp, match="training"):
        Linearized(head)(torch.randn(5, 4), torch.randn(1, 4))


@pytest.mark.parametrize("pooling", ["mean", "max", "none"])
def test_clarc_projection_matches_autograd(pooling):
    """P-ClArC's projection (paper 001, Eq. 3) in a head: the JVP rule equals autograd's JVP."""
    from hansgate.nn.units import ClarcProjection

    torch.manual_seed(0)
    c, hw = 4, 5
    d = c * hw * hw if pooling == "none" else c
    head = nn.Sequential(ClarcProjection(torch.randn(d), 0.7, pooling), nn.ReLU(), nn.Flatten(),
                         nn.Linear(c * hw * hw, 3)).eval()
    a = torch.randn(6, c, hw, hw)
    directions = torch.randn(2, 1, c, hw, hw)
    with torch.no_grad():
        out, sens = Linearized(head)(a, directions)
    torch.testing.assert_close(out, head(a))
    ref = reference_jvp(head, a, directions)
    assert sens.shape == ref.shape == (6, 2, 3)
    assert torch.allclose(sens, ref, rtol=1e-5, atol=1e-5 * (1 + float(ref.abs().max())))
