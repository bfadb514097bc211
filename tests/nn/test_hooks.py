"""hansgate.nn.hooks: scoped capture, leaf gradients at a layer, and the borrowed eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hansgate.errors import ConfigError
from hansgate.nn.hooks import capture, eval_mode, leaf_outputs, module_named


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(3, 2))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_copies_outputs_and_inputs_and_removes_its_hooks():
    model = _net().eval()
    x = torch.randn(5, 4)
    with capture(model, ["0", "3"]) as out, capture(model, ["3"], what="input") as inp:
        model(x)
        model(x[:2])
    assert [t.shape[0] for t in out["0"]] == [5, 2]
    lin = model[0](x)
    assert torch.equal(out["0"][0], lin)  # the copy was taken before the in-place ReLU
    assert torch.equal(inp["3"][0], torch.relu(lin))
    assert not out["0"][0].requires_grad and _hooks(model) == 0
    with pytest.raises(RuntimeError), capture(model, ["0"]):
        raise RuntimeError("boom")
    assert _hooks(model) == 0
    with pytest.raises(ConfigError, match="nope"):
        with capture(model, ["nope"]):
            pass


def test_capture_without_copy_keeps_the_graph():
    model = _net().eval()
    with capture(model, ["3"], copy=False) as out:
        model(torch.randn(2, 4))
    assert out["3"][0].requires_grad


def test_leaf_outputs_give_the_gradient_at_the_layer():
    model = _net().eval()
    x = torch.randn(3, 4)
    with leaf_outputs(model, "0") as leaves:
        y = model(x)
    (g,) = torch.autograd.grad(y[:, 1].sum(), leaves[0])
    w2 = model[3].weight[1]
    expected = (model[0](x) > 0).float() * w2  # d y_1 / d a = W2[1] * relu'(a)
    assert torch.allclose(g, expected, atol=1e-6)
    assert all(p.grad is None for p in model.parameters()) and _hooks(model) == 0


def test_eval_mode_restores_every_submodule_flag():
    model = _net().train()
    model[2].eval()  # a mixed state, as frozen batch-norm training leaves it
    with eval_mode(model) as m:
        assert m is model and not any(mod.training for mod in model.modules())
    assert model.training and model[0].training and not model[2].training
    with pytest.raises(ValueError), eval_mode(model):
        raise ValueError
    assert model.training and not model[2].training
    assert module_named(model, "3") is model[3]
