"""``Normalised``: ``model((x - mean) / std)`` per channel, as buffers that travel with the model and its export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hansgate.errors import ConfigError
from hansgate.nn.export import export_checked, run_onnx
from hansgate.nn.normalisation import Normalised


def test_matches_the_closed_form_per_channel():
    x = torch.rand(4, 3, 5, 5)
    out = Normalised(nn.Identity(), [0.1, 0.2, 0.3], [0.5, 2.0, 4.0])(x)
    for c, (m, s) in enumerate([(0.1, 0.5), (0.2, 2.0), (0.3, 4.0)]):
        assert torch.allclose(out[:, c], (x[:, c] - m) / s)


def test_buffers_are_state_and_follow_the_wrapped_model():
    inner = nn.Conv2d(2, 1, 1)
    wrapped = Normalised(inner, [0.5, 0.5], [0.25, 0.25])
    state = wrapped.state_dict()
    assert state["mean"].shape == (1, 2, 1, 1) and torch.equal(state["std"].flatten(), torch.tensor([0.25, 0.25]))
    assert set(state) == {"mean", "std", "model.weight", "model.bias"}
    x = torch.rand(3, 2, 4, 4)
    assert torch.allclose(wrapped(x), inner((x - 0.5) / 0.25))


def test_passes_tuples_through_and_exports():
    class Two(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.flatten(1)[:, :3], x.mean((1, 2, 3)).unsqueeze(1)

    graph = Normalised(Two(), [0.4], [0.1]).eval()
    x = torch.rand(5, 1, 3, 3)
    onnx_bytes, diff = export_checked(graph, x, ["logits", "average"])
    got = run_onnx(onnx_bytes, x.numpy())
    np.testing.assert_allclose(got[1][:, 0], ((x - 0.4) / 0.1).mean((1, 2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    assert diff <= 1e-4


@pytest.mark.parametrize("mean, std", [([], []), ([0.1], [0.1, 0.2]), ([0.0], [0.0]), ([0.0], [-1.0])])
def test_bad_statistics_are_one_clear_error(mean, std):
    with pytest.raises(ConfigError):
        Normalised(nn.Identity(), mean, std)
