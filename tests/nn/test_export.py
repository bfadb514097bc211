"""ONNX export checked against torch: dynamic batch, every output, refusal when the graph disagrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hansgate.errors import ExportError
from hansgate.nn.export import LOGIT_TOLERANCE, OPSET, export_checked, export_onnx, run_onnx


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()


def test_export_runs_any_batch_size_and_matches_torch():
    model = _model()
    x = torch.rand(7, 1, 6, 6)
    onnx_bytes, diff = export_checked(model, x, ["logits"])
    assert diff <= LOGIT_TOLERANCE
    for n in (1, 7, 300):  # dynamic batch, and run_onnx's own batching past 256
        xn = torch.rand(n, 1, 6, 6)
        np.testing.assert_allclose(run_onnx(onnx_bytes, xn.numpy())[0], model(xn).detach().numpy(), atol=1e-5)
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    assert [o.name for o in proto.graph.output] == ["logits"] and proto.graph.input[0].name == "input"
    assert any(op.version == OPSET for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def test_export_from_a_single_sample():
    model = _model()
    onnx_bytes = export_onnx(model, torch.rand(1, 1, 6, 6), ["logits"])
    assert run_onnx(onnx_bytes, np.random.rand(3, 1, 6, 6).astype(np.float32))[0].shape == (3, 4)


class _ExportsDifferently(nn.Module):
    """Adds 1e-2 to its logits only while being exported: the check must catch the difference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.flatten(1)[:, :2]
        return out + 1e-2 if torch.compiler.is_exporting() else out


def test_a_graph_that_disagrees_with_torch_is_refused():
    with pytest.raises(ExportError, match="disagrees with torch"):
        export_checked(_ExportsDifferently(), torch.rand(4, 1, 2, 2), ["logits"])
    assert export_checked(_ExportsDifferently(), torch.rand(4, 1, 2, 2), ["logits"], tolerance=0.1)[1] == \
        pytest.approx(1e-2, rel=1e-3)


def test_no_samples_and_unexportable_models_are_one_clear_error():
    with pytest.raises(ExportError, match="no samples"):
        export_checked(_model(), torch.rand(0, 1, 6, 6), ["logits"])

    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_exporting():
                raise RuntimeError("cannot trace this\nand a second line of detail")
            return x

    with pytest.raises(ExportError, match="ONNX export failed") as info:
        export_onnx(Untraceable(), torch.rand(2, 1, 2, 2), ["logits"])
    assert "\n" not in str(info.value)


def test_single_file_writer_keeps_every_initializer_and_the_graph(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(3, 3, 8, 8)
    ours = onnx.load_from_string(export_onnx(model, x, ["logits"]))
    torch.onnx.export(model, (x[:2],), str(tmp_path / "ref.onnx"), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},), opset_version=OPSET,
                      dynamo=True, external_data=False, verbose=False)
    ref = onnx.load(str(tmp_path / "ref.onnx"))
    onnx.checker.check_model(ours)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in ref.graph.initializer}
    assert arrays.keys() == want.keys() and all(np.array_equal(arrays[k], want[k]) for k in want)
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in ref.graph.node]


def test_allowed_difference_grows_with_the_logits_size():
    from hansgate.nn.export import allowed_difference

    assert allowed_difference(np.array([[0.5, -0.9]])) == LOGIT_TOLERANCE  # small logits: the plain tolerance
    assert allowed_difference(np.array([[300.0, -1200.0]])) == pytest.approx(1200 * LOGIT_TOLERANCE)
    assert allowed_difference(np.array([[np.nan, 1.0]])) == 0.0  # nothing passes a non-finite reference


def test_export_check_scales_with_large_logits():
    """A model whose logits are in the thousands passes: its float32 rounding is judged at their size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        model[1].weight.mul_(5000)
    x = torch.rand(8, 3, 2, 2)
    _, diff = export_checked(model, x, ["logits"])
    with torch.no_grad():
        assert diff <= LOGIT_TOLERANCE * float(model(x).abs().max())
