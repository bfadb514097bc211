"""Model roles: the torch side normalises as the refine side did, whatever the graph does."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hansgate.audit.roles import ModelInfo, raw_pixel_model, standardise, torch_predictor
from hansgate.manifest import InputSpec
from hansgate.nn.normalisation import Normalised

SPEC = InputSpec(channels=3, height=3, width=3, mean=[0.5, 0.25, 0.0], std=[0.5, 2.0, 1.0], color_mode="RGB",
                 normalization_in_graph=True)
IDENTITY = InputSpec(channels=3, height=3, width=3, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], color_mode="RGB")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(27, 3)).eval()


def test_standardise_is_per_channel_even_when_the_graph_normalises():
    x = np.random.default_rng(0).random((4, 3, 3, 3)).astype(np.float32)
    got = standardise(x, SPEC)
    np.testing.assert_allclose(got[:, 0], (x[:, 0] - 0.5) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], (x[:, 1] - 0.25) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(got[:, 2], x[:, 2], rtol=1e-6)
    assert got.dtype == np.float32
    assert np.array_equal(standardise(x, IDENTITY), x)


def test_raw_pixel_model_and_torch_predictor_agree_with_the_model_on_normalised_inputs():
    model = _model()
    x = np.random.default_rng(1).random((5, 3, 3, 3)).astype(np.float32)
    want = model(torch.from_numpy(standardise(x, SPEC))).detach()
    wrapped = raw_pixel_model(model, SPEC)
    assert isinstance(wrapped, Normalised)
    torch.testing.assert_close(wrapped(torch.from_numpy(x)).detach(), want)
    torch.testing.assert_close(torch.from_numpy(torch_predictor(model, SPEC)(x)), want)
    assert raw_pixel_model(model, IDENTITY) is model


def test_model_info_layout():
    assert ModelInfo("refined (egem)", "onnx", "ab").as_dict() == {"label": "refined (egem)", "kind": "onnx",
                                                                   "sha256": "ab"}
    assert ModelInfo("original", "torch", "cd", None).as_dict()["weights"] is None
